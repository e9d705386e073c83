"""Many adapters on one base: padding, stacking, per-example routing and combining.

* :func:`pad_rank` pads a delta's adapters with zero rank components and, by
  default, folds each scale into its output-side factor: padded adapters of
  equal ranks then have equal tree structures (the scale is static metadata),
  so they swap into a compiled function without recompiling.
* :func:`stack` turns ``n`` deltas into one whose adapters carry a leading
  adapter axis (:class:`StackedNode`); ``lora_apply(fn)(base, stacked, x,
  adapter_ids=ids)`` then gives example ``i`` of the batch adapter ``ids[i]``
  (``-1``: the bare base model), in one pass with gathered low-rank factors.
  Any node type stacks (LoRA, DoRA, VeRA, AdaLoRA) as long as the stacked
  adapters agree on their static metadata.
* :func:`combine_adapters` merges several additive adapters into one.

Modules: :mod:`._stacked` (the node type), :mod:`._stack` (padding, stacking,
selecting) and :mod:`._combine`.
"""

from jaxlora.multi._combine import combine_adapters as combine_adapters
from jaxlora.multi._stack import pad_rank as pad_rank
from jaxlora.multi._stack import select as select
from jaxlora.multi._stack import stack as stack
from jaxlora.multi._stacked import StackedNode as StackedNode

__all__ = ["StackedNode", "combine_adapters", "pad_rank", "select", "stack"]
