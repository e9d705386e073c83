"""Many adapters on one base: stacking, routing, training many at once, serving pools.

* :func:`pad_rank` pads a delta's adapters with zero rank components and, by
  default, folds each scale into its output-side factor: padded adapters of
  equal ranks then have equal tree structures (the scale is static metadata),
  so they swap into a compiled function without recompiling.
* :func:`stack` turns ``n`` deltas into one whose adapters carry a leading
  adapter axis (:class:`StackedNode`); ``lora_apply(fn)(base, stacked, x,
  adapter_ids=ids)`` then gives example ``i`` of the batch adapter ``ids[i]``
  (``-1``: the bare base model), in one pass (``lora_apply``'s ``routing=``
  says how). Any node type stacks (LoRA, DoRA, VeRA, AdaLoRA) as long as the
  stacked adapters agree on their static metadata.
* Training many adapters in one step: :func:`per_adapter_loss` (each
  adapter's mean loss), :func:`per_adapter` (an optimizer per adapter, with
  its own learning rate and state) and :func:`unstack` (back to ``n`` deltas).
* Serving: :func:`adapter_pool`, :func:`put` and :func:`clear`: a pool of
  fixed-capacity slots filled and emptied without recompiling.
* :func:`combine_adapters` merges several additive adapters into one.

Modules: :mod:`._stacked` (the node type), :mod:`._stack` (padding, stacking,
selecting), :mod:`._tenants` (training), :mod:`._pool` (serving) and
:mod:`._combine`.
"""

from jaxlora.multi._combine import combine_adapters as combine_adapters
from jaxlora.multi._pool import adapter_pool as adapter_pool
from jaxlora.multi._pool import clear as clear
from jaxlora.multi._pool import put as put
from jaxlora.multi._stack import pad_rank as pad_rank
from jaxlora.multi._stack import select as select
from jaxlora.multi._stack import stack as stack
from jaxlora.multi._stacked import StackedNode as StackedNode
from jaxlora.multi._tenants import per_adapter as per_adapter
from jaxlora.multi._tenants import per_adapter_loss as per_adapter_loss
from jaxlora.multi._tenants import unstack as unstack

__all__ = [
    "StackedNode",
    "adapter_pool",
    "clear",
    "combine_adapters",
    "pad_rank",
    "per_adapter",
    "per_adapter_loss",
    "put",
    "select",
    "stack",
    "unstack",
]
