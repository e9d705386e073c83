"""Parameter paths, target matching and weight layouts.

A parameter's *path* is its pytree key path joined with ``/``:
``{'params': {'layers_0': {'query': {'kernel': W}}}}`` gives
``'params/layers_0/query/kernel'``. Targets, exclusions and per-path patterns
are matched against these strings with :func:`re.search`.

Flax wraps leaves in boxes: ``nnx.Variable`` (in an ``nnx.State``) and linen's
``AxisMetadata`` (``nn.Partitioned``). Both are treated as leaves here, and
:func:`unbox` / :func:`rebox` reach the array inside. A quantized weight
(:class:`jaxlora.quant.QuantizedArray`) is a pytree too and also one leaf here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta

# Presets match the module name (the path component before the leaf name) and
# the leaf name. Biases and norm scales are never matched: their leaf names are
# not among ``_WEIGHT_NAMES``.
_WEIGHT_NAMES = r"(kernel|weight|w)"
_ATTENTION_MODULES = (
    r"(query|key|value|out|q|k|v|o|q_proj|k_proj|v_proj|o_proj|out_proj|"
    r"wq|wk|wv|wo|qkv|qkv_proj|c_attn|query_key_value)"
)
_MLP_MODULES = (
    r"(gate_proj|up_proj|down_proj|fc1|fc2|fc_in|fc_out|w1|w2|w3|wi|wi_0|wi_1|"
    r"c_fc|c_proj|dense_h_to_4h|dense_4h_to_h|up|down|gate)"
)
# Blocks whose every weight belongs to attention, or to the MLP: a weight inside one is
# classified by the block (GPT-2's attn/c_proj is attention's, T5's DenseReluDense/wo the
# MLP's), and a module name of the other kind is ignored there.
_ATTENTION_BLOCKS = (
    r"(attn|attention|self_attn|self_attention|SelfAttention|EncDecAttention|encoder_attn|"
    r"cross_attn|cross_attention|crossattention)"
)
_MLP_BLOCKS = r"(mlp|ffn|feed_forward|DenseReluDense|DenseGatedActDense|intermediate)"
_HEAD_MODULES = r"(lm_head|classifier|head|score|output_layer|logits)"
# a module of this name whose kernel has 3+ axes is a convolution (Whisper's conv1, ViT's
# patch embeddings, linen's Conv_0); ConvNeXt's 2-D pwconv1 is a linear layer
_CONV_MODULE = re.compile(r"(^|/)[^/]*((?i:conv)|patch_embed)[^/]*/")
_NOT_WEIGHT_MODULES = r"(?!(.*/)?[^/]*(?i:norm|bias|embed)[^/]*/[^/]+$)"  # in an attention block
PRESETS: dict[str, str] = {
    "attention": (
        rf"(^(?!(.*/)?{_MLP_BLOCKS}/)(.*/)?{_ATTENTION_MODULES}/{_WEIGHT_NAMES}$"
        rf"|(^|/){_ATTENTION_BLOCKS}/(?!(.*/)?{_MLP_BLOCKS}/){_NOT_WEIGHT_MODULES}"
        rf"(.+/)?{_WEIGHT_NAMES}$)"
    ),
    "mlp": (
        rf"(^(?!(.*/)?{_ATTENTION_BLOCKS}/)(.*/)?{_MLP_MODULES}/{_WEIGHT_NAMES}$"
        rf"|(^|/){_MLP_BLOCKS}/(.+/)?{_WEIGHT_NAMES}$"
        rf"|(^|/)(ffn|ffn_output)/{_WEIGHT_NAMES}$"  # ALBERT's MLP
        rf"|(^|/)(?<!attention/)output/dense/{_WEIGHT_NAMES}$)"  # BERT's MLP output
    ),
    "all-linear": rf"(^|/)[^/]+/{_WEIGHT_NAMES}$",
}
_ALL_LINEAR_EXCLUDE = rf"(^|/){_HEAD_MODULES}/"

Targets = str | Sequence[str] | Callable[[str, Any], bool]


def key_str(key: Any) -> str:
    """One path component as text."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path joined with ``/``."""
    return "/".join(key_str(k) for k in path)


def is_box(x: Any) -> bool:
    """Whether ``x`` counts as one parameter leaf although it is a pytree node.

    True for Flax boxes around an array (``nnx.Variable``, ``nn.Partitioned``)
    and for pytree types that stand for one weight, which say so with a true
    ``jaxlora_weight`` class attribute (:class:`jaxlora.quant.QuantizedArray`;
    this module sits below the quantization package and does not import it).
    """
    return isinstance(x, nnx.Variable | meta.AxisMetadata) or getattr(
        type(x), "jaxlora_weight", False
    )


def unbox(x: Any) -> Any:
    """The array inside a Flax box, or ``x`` itself."""
    if isinstance(x, nnx.Variable):
        return x.get_value()
    if isinstance(x, meta.AxisMetadata):
        return x.unbox()
    return x


def rebox(box: Any, value: Any) -> Any:
    """``box`` with its array replaced by ``value`` (``value`` itself if ``box`` is no box)."""
    if isinstance(box, nnx.Variable):
        return box.replace(value)
    if isinstance(box, meta.AxisMetadata):
        return box.replace_boxed(value)
    return value


def leaves_with_paths(tree: Any) -> Iterator[tuple[str, Any]]:
    """Yields ``(path, leaf)`` for every leaf of ``tree``, Flax boxes counting as leaves."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]:
        yield path_str(path), leaf


def compile_pattern(pattern: str, what: str) -> re.Pattern[str]:
    """``re.compile`` with an error that says which option held the bad regex."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what}={pattern!r} is not a valid regular expression: {e}") from None


def target_predicate(targets: Targets, exclude: Targets | None) -> Callable[[str, Any], bool]:
    """Turns ``targets``/``exclude`` (regex, list, preset or predicate) into one predicate."""
    include = _predicate(targets, "targets")
    if targets == "all-linear":
        head = re.compile(_ALL_LINEAR_EXCLUDE)
        base_include = include
        conv = lambda p, x: _CONV_MODULE.search(p) is not None and getattr(x, "ndim", 0) >= 3
        include = lambda p, x: base_include(p, x) and not head.search(p) and not conv(p, x)
    if exclude is None:
        return include
    excluded = _predicate(exclude, "exclude")
    return lambda p, x: include(p, x) and not excluded(p, x)


def _predicate(spec: Targets, what: str) -> Callable[[str, Any], bool]:
    if callable(spec):
        return spec
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, Sequence) or not all(isinstance(s, str) for s in spec) or not spec:
        raise TypeError(
            f"{what} must be a regex string, a non-empty list of regex strings, a preset "
            f"({', '.join(map(repr, PRESETS))}) or a callable (path, leaf) -> bool; "
            f"got {spec!r}"
        )
    patterns = [compile_pattern(PRESETS.get(s, s), what) for s in spec]
    return lambda p, x: any(pat.search(p) for pat in patterns)


def first_match(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """The value of the first regex in ``patterns`` that ``re.search`` finds in ``path``."""
    for pattern, value in patterns.items():
        if re.search(pattern, path):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a weight's axes read: ``shape == stacked + inputs + outputs``.

    Attributes:
        stacked: leading axes that index layers (``nn.scan``, ``vmap``); kept on the adapters.
        inputs: the axes the weight contracts with its input.
        outputs: the remaining (output) axes.
    """

    stacked: tuple[int, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stacked + self.inputs + self.outputs

    @property
    def n_in(self) -> int:
        return math.prod(self.inputs)

    @property
    def n_out(self) -> int:
        return math.prod(self.outputs)

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """The weight viewed as a stack of ``(n_in, n_out)`` matrices."""
        return (*self.stacked, self.n_in, self.n_out)


_NOT_WEIGHTS = ("bias", "scale", "b", "offset")


def layout_hint(path: str, layout: Layout) -> str:
    """Advice for a weight whose layout leaves no room for a rank (for the error message)."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf in _NOT_WEIGHTS:
        module = path.rsplit("/", 1)[0] if "/" in path else path
        return (
            f" {path!r} looks like a bias or norm scale (leaf {leaf!r}), matched because the "
            f"targets name its module: target the weight alone, e.g. targets='{module}/kernel'"
            + ("; a 2-D bias means axis 0 stacks layers: pass stacked_axes=1 too." if not
               layout.stacked and len(layout.shape) == 2 else ".")
        )  # fmt: skip
    if not layout.stacked and len(layout.shape) >= 3:
        return (
            " If its axis 0 stacks layers (nn.scan, nnx.scan) or experts, pass stacked_axes=1 "
            "(or {regex: 1}); if it has several input axes, such as attention's output "
            "(heads, head_dim, d_model), pass input_axes."
        )
    return ""


def read_layout(
    path: str, shape: tuple[int, ...], stacked_axes: int | None, input_axes: int | None
) -> Layout:
    """Reads a weight's layout, raising where the shape cannot be read unambiguously.

    ``None`` means the default: no stacked axis, one input axis, which fits Dense
    ``(in, out)``, q/k/v DenseGeneral ``(d_model, heads, head_dim)`` and embedding
    tables ``(vocab, features)``. A weight of four or more axes (a conv kernel,
    an output DenseGeneral over several axes) must be described explicitly.
    """
    ndim = len(shape)
    n_stacked = 0 if stacked_axes is None else stacked_axes
    if input_axes is None:
        if ndim - n_stacked >= 4:
            raise ValueError(
                f"cannot read the layout of {path!r} with shape {shape}: "
                f"{ndim - n_stacked} non-stacked axes are ambiguous (a conv kernel "
                "(kh, kw, in, out) has 3 input axes; a DenseGeneral kernel may have "
                "several). Set LoraConfig(input_axes={...}) for this path, e.g. "
                f"input_axes={{{re.escape(path.rsplit('/', 1)[0])!r}: 3}}"
            )
        n_input = 1
    else:
        n_input = input_axes
    if ndim - n_stacked - n_input < 1 or n_input < 1:
        raise ValueError(
            f"cannot adapt {path!r} with shape {shape} using stacked_axes={n_stacked} and "
            f"input_axes={n_input}: a weight needs at least one input and one output axis "
            "after its stacked axes. Check stacked_axes/input_axes for this path."
        )
    return Layout(
        stacked=tuple(shape[:n_stacked]),
        inputs=tuple(shape[n_stacked : n_stacked + n_input]),
        outputs=tuple(shape[n_stacked + n_input :]),
    )


def is_float_array(x: Any) -> bool:
    """Whether ``x`` is an array (or abstract array) of a floating dtype."""
    return hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
