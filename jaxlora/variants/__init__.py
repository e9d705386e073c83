"""The LoRA family: DoRA, VeRA, AdaLoRA, layer-wise rank allocation and LoRA+.

Every variant keeps the contract of plain LoRA: a config for
:func:`jaxlora.split`, then ``lora_apply``, ``merge``, ``unmerge`` and
``trainable_mask`` unchanged, so switching is a one-line change:

* DoRA: ``LoraConfig(..., use_dora=True)`` (:class:`DoraNode`);
* rsLoRA: ``LoraConfig(..., rslora=True)``;
* VeRA: :class:`VeraConfig`;
* AdaLoRA: :class:`AdaLoraConfig` with the :func:`adalora` optimizer wrapper;
* layer-wise ranks: :func:`allocate_ranks` returns a ``LoraConfig`` ``rank_pattern``;
* LoRA+: :func:`loraplus`, an optimizer with a larger learning rate for ``b``.
"""

from jaxlora.variants.adalora import AdaLoraConfig as AdaLoraConfig
from jaxlora.variants.adalora import AdaLoraNode as AdaLoraNode
from jaxlora.variants.adalora import orthogonality_loss as orthogonality_loss
from jaxlora.variants.adalora import to_lora as to_lora
from jaxlora.variants.adalora_optimizer import AdaLoraState as AdaLoraState
from jaxlora.variants.adalora_optimizer import adalora as adalora
from jaxlora.variants.allocate import allocate_ranks as allocate_ranks
from jaxlora.variants.dora import DoraNode as DoraNode
from jaxlora.variants.loraplus import loraplus as loraplus
from jaxlora.variants.vera import VeraConfig as VeraConfig
from jaxlora.variants.vera import VeraNode as VeraNode
from jaxlora.variants.vera import VeraProjection as VeraProjection
