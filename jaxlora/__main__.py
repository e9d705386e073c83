import sys

from jaxlora.apps.cli import main

sys.exit(main())
