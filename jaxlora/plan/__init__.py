"""The memory planner: parameters, checkpoint sizes and training memory before training.

:func:`plan` answers, for a model that need not fit anywhere yet, what full
fine-tuning, LoRA and QLoRA would cost: how many parameters train, how large
the saved result is, and how much memory one optimizer step needs on each
device. Nothing is allocated: parameters are ``jax.ShapeDtypeStruct`` s,
:func:`jaxlora.split` and :func:`jaxlora.quant.quantize` run under
``jax.eval_shape``, and each training step is compiled for abstract inputs so
that XLA's own memory plan (``memory_analysis()``) gives the peak per device.

Counting needs no compilation and is exact: the trainable count is the size of
the adapters ``split`` makes. For GPT-3 175B (96 layers, d_model 12288) with
rank 4 on the query and value projections that is
``96 × 2 × (12288·4 + 4·12288) = 18,874,368`` parameters, a 37.7 MB float16
checkpoint against the model's 350 GB (Hu et al. 2021, Section 4.2 and
Table 4: "18.9M", "35MB", "about 10,000×").

The command line ``jaxlora plan`` (:mod:`jaxlora.apps.plan_cli`) plans a
Llama-style decoder given by a preset, by size flags or by a Hugging Face
``config.json``.

References:
    Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models.
    https://arxiv.org/abs/2106.09685
    Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs.
    https://arxiv.org/abs/2305.14314
"""

from jaxlora.plan._api import plan as plan
from jaxlora.plan._report import MethodPlan as MethodPlan
from jaxlora.plan._report import Plan as Plan
from jaxlora.plan._report import parse_bytes as parse_bytes

__all__ = ["MethodPlan", "Plan", "parse_bytes", "plan"]
