"""``python -m jaxlora demo-llm``: LoRA and QLoRA fine-tuning of SmolLM2-135M-Instruct.

See :mod:`._main` for what it prints, :mod:`._task` for the chat task.
"""

from jaxlora.apps.llm_demo._main import DEFAULTS as DEFAULTS
from jaxlora.apps.llm_demo._main import QUICK as QUICK
from jaxlora.apps.llm_demo._main import add_arguments as add_arguments
from jaxlora.apps.llm_demo._main import model_file as model_file
from jaxlora.apps.llm_demo._main import run as run
