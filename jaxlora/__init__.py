"""jaxlora: LoRA fine-tuning for JAX and Flax.

Split a parameter tree into a frozen base and a low-rank delta, train the
delta with any optax optimizer, merge it back for serving.

Every adapter node type (LoRA and its variants) follows one protocol, described
in :mod:`jaxlora._node`: its array leaves are exactly what trains, its fixed
values are static metadata, and it declares how it contributes at a use site,
merges, serializes, shards and stacks.
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
