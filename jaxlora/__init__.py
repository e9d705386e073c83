"""jaxlora: LoRA fine-tuning for JAX and Flax.

Split a parameter tree into a frozen base and a low-rank delta, train the
delta with any optax optimizer, merge it back for serving.

Every adapter node type (LoRA and its variants) follows one protocol, described
in :mod:`jaxlora._node`: its array leaves are exactly what trains, its fixed
values are static metadata, and it declares how it contributes at a use site,
merges, serializes, shards and stacks.

The package reads top to bottom in layers; a module imports only from its own
layer or below, at module level (``tests/test_package.py`` checks it):

0. paths, configs and nodes: ``_hosts`` (processes of a multi-host run),
   ``_paths``, ``_config``, ``_node`` (the protocol), ``_delta`` (``LoraNode``),
   ``_placement`` (shardings of adapters), ``_checks``;
1. ``quant``: quantized base weights;
2. ``_split``, ``_merge``, ``_counts``: split, merge/unmerge, masks and counts;
3. ``_engine``: the use-site interpreter behind ``lora_apply``;
4. ``_apply``: ``lora_apply``;
5. ``multi``, ``variants``, ``sharding``, ``io`` (checkpoints, PEFT files),
   ``memory`` (training-step builders and XLA memory reports);
6. ``plan``: the memory planner;
7. this module, which only re-exports;
8. ``models``: reference models and their checkpoint loaders (the library above
   imports none of them);
9. ``apps``: the command line, the demos and their data.
"""

from jaxlora import multi as multi
from jaxlora import variants as variants
from jaxlora._apply import lora_apply as lora_apply
from jaxlora._config import LoraConfig as LoraConfig
from jaxlora._counts import ParameterCount as ParameterCount
from jaxlora._counts import adapter_nbytes as adapter_nbytes
from jaxlora._counts import count_parameters as count_parameters
from jaxlora._counts import summary as summary
from jaxlora._counts import trainable_mask as trainable_mask
from jaxlora._delta import LoraNode as LoraNode
from jaxlora._engine import FallbackError as FallbackError
from jaxlora._engine import FallbackWarning as FallbackWarning
from jaxlora._engine import infer_layout as infer_layout
from jaxlora._hosts import global_batch as global_batch
from jaxlora._hosts import process_rows as process_rows
from jaxlora._merge import merge as merge
from jaxlora._merge import unmerge as unmerge
from jaxlora._split import split as split
from jaxlora.io.checkpoint import load_adapter as load_adapter
from jaxlora.io.checkpoint import save_adapter as save_adapter
from jaxlora.io.peft import load_peft as load_peft
from jaxlora.io.peft import save_peft as save_peft
from jaxlora.multi import combine_adapters as combine_adapters
from jaxlora.multi import pad_rank as pad_rank
from jaxlora.multi import stack as stack
from jaxlora.quant import QuantizedArray as QuantizedArray
from jaxlora.quant import dequantize as dequantize
from jaxlora.quant import quantize as quantize
from jaxlora.sharding import adapter_shardings as adapter_shardings

__version__ = "0.1.0"
