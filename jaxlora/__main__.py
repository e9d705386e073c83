import sys

from jaxlora.cli import main

sys.exit(main())
