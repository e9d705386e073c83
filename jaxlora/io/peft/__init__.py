"""Hugging Face PEFT adapter files: write a delta that PEFT loads, and read PEFT's files.

:func:`save_peft` and :func:`load_peft` handle every method jaxlora shares with
PEFT: LoRA (and rsLoRA, PiSSA, OLoRA, which are LoRA files), DoRA (LoRA files
with ``use_dora`` and ``lora_magnitude_vector`` s), VeRA and AdaLoRA. Module
names come from a key map (:class:`KeyMap`, :data:`BERT_KEY_MAP`,
:data:`LLAMA_KEY_MAP`, or any function ``path -> name``); a weight stacked over
layers (``nn.scan``) is written as one PEFT module per layer.

* :mod:`._format`: what all PEFT files share, and the codec protocol each node
  type declares (its ``peft`` attribute);
* :mod:`._lora`: the LoRA and DoRA format; the VeRA and AdaLoRA formats sit in
  :mod:`._vera` and :mod:`._adalora`;
* :mod:`._reading`: reading and checking files, and finding base weights by module;
* :mod:`._writer` and :mod:`._reader`: the two functions.

Example:
    >>> import json, pathlib, tempfile
    >>> import jax, jax.numpy as jnp, jaxlora
    >>> from jaxlora.io import peft
    >>> params = {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 4))}}}}
    >>> config = jaxlora.LoraConfig(rank=2, alpha=4, targets="q_proj")
    >>> _, delta = jaxlora.split(params, config, key=jax.random.key(0))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = peft.save_peft(tmp, delta, config=config, key_map=peft.LLAMA_KEY_MAP)
    ...     written = json.loads(pathlib.Path(tmp, "adapter_config.json").read_text())
    >>> written["target_modules"], written["r"], written["lora_alpha"]
    (['model.layers.0.self_attn.q_proj'], 2, 4)
"""

from jaxlora.io.peft._format import CONFIG_NAME as CONFIG_NAME
from jaxlora.io.peft._format import WEIGHTS_NAME as WEIGHTS_NAME
from jaxlora.io.peft._keymaps import BERT_KEY_MAP as BERT_KEY_MAP
from jaxlora.io.peft._keymaps import LLAMA_KEY_MAP as LLAMA_KEY_MAP
from jaxlora.io.peft._keymaps import KeyMap as KeyMap
from jaxlora.io.peft._lora import LoraCodec as LoraCodec
from jaxlora.io.peft._reader import load_peft as load_peft
from jaxlora.io.peft._writer import save_peft as save_peft

__all__ = [
    "BERT_KEY_MAP",
    "CONFIG_NAME",
    "LLAMA_KEY_MAP",
    "WEIGHTS_NAME",
    "KeyMap",
    "LoraCodec",
    "load_peft",
    "save_peft",
]
