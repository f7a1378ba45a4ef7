"""Find the layers a low-rank method adapts, view their weights as (out, in) matrices, swap modules.

Supported layer kinds: ``torch.nn.Linear``; transformers' GPT-2 ``Conv1D`` (weight stored (in, out),
i.e. PEFT's ``fan_in_fan_out``); bitsandbytes ``Linear4bit`` (NF4/FP4) and ``Linear8bitLt``. Every
method reasons about ``W`` as an (out, in) matrix acting as ``y = W x``; :func:`weight_matrix` and
:func:`to_storage_layout` translate between that view and each kind's storage.

Example:
    >>> from loralab.core.testing import tiny_llama
    >>> from loralab.core.targets import find_targets
    >>> targets = find_targets(tiny_llama(), "all-linear")
    >>> sorted({t.name.rsplit(".", 1)[-1] for t in targets.values()})
    ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union, cast

from torch import Tensor, nn

from loralab.core.modules import (
    LayerKind,
    TargetNotFoundError,
    get_module,
    layer_kind,
    replace_module,
)
from loralab.core.modules import weight_parameter as _weight

logger = logging.getLogger(__name__)

__all__ = [
    "LayerKind",
    "TargetLayer",
    "TargetNotFoundError",
    "find_all_linear_modules",
    "find_targets",
    "get_module",
    "layer_kind",
    "replace_module",
    "to_storage_layout",
    "weight_matrix",
]

TargetSpec = Union[str, Sequence[str], None]

# Sub-module names of task heads that are trained in full (PEFT's modules_to_save), never adapted
# by default: a low-rank adapter on a freshly initialised head makes no sense.
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "cls", "pooler")


def weight_matrix(module: nn.Module) -> Tensor:
    """The layer's weight as an (out, in) matrix.

    For ``Linear`` this is the weight itself; for ``Conv1D`` a transposed view (no copy); for
    bitsandbytes layers a dequantized float copy (see :mod:`loralab.core.quant`).
    """
    kind = layer_kind(module)
    if kind == "linear":
        return _weight(module)
    if kind == "conv1d":
        return _weight(module).T
    if kind in ("linear4bit", "linear8bit"):
        from loralab.core.quant import dequantize_weight

        return dequantize_weight(module)
    raise TypeError(
        f"{type(module).__name__} is not an adaptable layer (Linear, Conv1D, bnb Linear4bit/Linear8bitLt)"
    )


def to_storage_layout(module: nn.Module, matrix: Tensor) -> Tensor:
    """Turn an (out, in) matrix (a weight or its gradient) into ``module.weight``'s storage layout."""
    return matrix.T if layer_kind(module) == "conv1d" else matrix


@dataclass(frozen=True)
class TargetLayer:
    """One adaptable layer of a model."""

    name: str
    """Qualified name inside the model, e.g. ``model.layers.0.self_attn.q_proj``."""
    module: nn.Module
    """The layer itself."""
    kind: LayerKind
    """What the layer is; decides how its weight maps to an (out, in) matrix."""

    @property
    def in_features(self) -> int:
        return _in_out(self.module, self.kind)[0]

    @property
    def out_features(self) -> int:
        return _in_out(self.module, self.kind)[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``: the shape of :meth:`weight_matrix`."""
        i, o = _in_out(self.module, self.kind)
        return (o, i)

    @property
    def weight(self) -> nn.Parameter:
        """The stored weight parameter (storage layout; quantized for bitsandbytes)."""
        return _weight(self.module)

    @property
    def is_quantized(self) -> bool:
        return self.kind in ("linear4bit", "linear8bit")

    def weight_matrix(self) -> Tensor:
        """The weight as an (out, in) matrix; see :func:`weight_matrix`."""
        return weight_matrix(self.module)

    def gradient_matrix(self) -> Tensor | None:
        """``weight.grad`` as an (out, in) matrix, or ``None`` when there is none."""
        g = _weight(self.module).grad
        return None if g is None else to_storage_layout(self.module, g)


def _in_out(module: nn.Module, kind: LayerKind) -> tuple[int, int]:
    # the sizes are plain ints on every adaptable kind (Conv1D.nf, Linear.in/out_features)
    if kind == "conv1d":
        w = _weight(module)
        # a DeepSpeed ZeRO-3 partitioned weight is empty; its whole shape is ds_shape
        return getattr(w, "ds_shape", w.shape)[0], cast(int, module.nf)
    return cast(int, module.in_features), cast(int, module.out_features)


def _head_prefixes(model: nn.Module) -> set[str]:
    heads: set[str] = set()
    out_emb = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out_emb = get_out()
        except (AttributeError, NotImplementedError):
            out_emb = None
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if (out_emb is not None and mod is out_emb) or last in HEAD_NAMES:
            heads.add(name)
    return heads


def _base_layer(module: nn.Module) -> nn.Module | None:
    base = getattr(module, "base_layer", None)
    if not isinstance(base, nn.Module):
        return None
    while isinstance(inner := getattr(base, "base_layer", None), nn.Module):  # nested wrappers
        base = inner
    return base


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    # Same semantics as PEFT's target_modules: a string is a full-match regex on the qualified name,
    # a list matches a qualified name exactly or its dotted suffix.
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec = "all-linear",
    *,
    exclude_modules: TargetSpec = None,
    include_heads: bool = False,
) -> dict[str, TargetLayer]:
    """Adaptable layers of ``model`` selected by ``target_modules``, in module order.

    Args:
        model: any ``nn.Module`` (a transformers model, a PEFT base model, a plain module).
        target_modules: ``"all-linear"`` (every adaptable layer), a regex matched against the whole
            qualified name, or a list of names matched exactly or as a dotted suffix
            (``["q_proj", "v_proj"]``), as in ``peft.LoraConfig``.
        exclude_modules: the same forms, removed from the selection.
        include_heads: adapt output/task heads too (``lm_head``, ``classifier``, ``score``, …, and the
            model's output embedding). Off by default, as PEFT's ``"all-linear"``.

    Raises:
        TargetNotFoundError: nothing matched, or a listed name matched a non-adaptable module; the
            message lists the candidate layer names.

    Example:
        >>> from loralab.core.testing import tiny_gpt2
        >>> t = find_targets(tiny_gpt2(), ["c_attn"])
        >>> next(iter(t.values())).kind
        'conv1d'
    """
    if target_modules is None:
        raise TargetNotFoundError(
            "target_modules is None: pass 'all-linear', a regex, or a list of layer names"
        )
    heads = set() if include_heads else _head_prefixes(model)
    candidates: dict[str, TargetLayer] = {}
    non_adaptable_matches: list[str] = []
    wrappers: list[str] = []
    skipped_heads: list[str] = []
    for name, mod in model.named_modules():
        # An adapter wrapper (PEFT's LoRA layers keep the original layer as ``base_layer``) stands for
        # its base layer under its own name; its insides (base_layer, lora_A, lora_B, ...) are not targets.
        if wrappers and _under(name, [w for w in wrappers if w != name]):
            continue
        base = _base_layer(mod)
        if base is not None:
            wrappers.append(name)
            mod = base
        kind = layer_kind(mod)
        if kind is None:
            if (
                target_modules != "all-linear"
                and name
                and _matches(name, target_modules)
                and not list(mod.children())
            ):
                non_adaptable_matches.append(f"{name} ({type(mod).__name__})")
            continue
        if ".base_layer" in f".{name}":
            continue
        if _under(name, heads):
            if target_modules != "all-linear" and _matches(name, target_modules):
                skipped_heads.append(name)
            continue
        candidates[name] = TargetLayer(name, mod, kind)
    if target_modules == "all-linear":
        selected = dict(candidates)
    else:
        selected = {n: t for n, t in candidates.items() if _matches(n, target_modules)}
    if exclude_modules is not None:
        selected = {n: t for n, t in selected.items() if not _matches(n, exclude_modules)}
    if exclude_modules is not None:  # heads the user excluded by name are left out on purpose
        skipped_heads = [n for n in skipped_heads if not _matches(n, exclude_modules)]
    if skipped_heads:
        # not silent: a listed name also matches head layers (e.g. "dense" and RoBERTa's classifier.dense)
        logger.warning(
            "target_modules=%r also matches task/output head layer(s) %s, which are left out (not adapted); "
            "pass include_heads=True to adapt them",
            target_modules,
            ", ".join(skipped_heads[:10]),
        )
    if non_adaptable_matches:
        raise TargetNotFoundError(
            f"target_modules={target_modules!r} matched layers loralab cannot adapt: "
            f"{', '.join(non_adaptable_matches[:10])}. Adaptable kinds are Linear, Conv1D and bitsandbytes Linear4bit/Linear8bitLt."
        )
    if not selected:
        names = sorted({n.rsplit(".", 1)[-1] for n in candidates}) or ["<none>"]
        raise TargetNotFoundError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no adaptable layer "
            f"of {type(model).__name__}; candidate layer names: {', '.join(names)}"
        )
    return selected


def find_all_linear_modules(model: nn.Module) -> list[str]:
    """Short names of every adaptable layer except heads, e.g. ``['down_proj', 'q_proj', …]``.

    The LoRA-GA reference's helper of the same name: pass the result as ``LoraConfig.target_modules``.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> "q_proj" in find_all_linear_modules(tiny_llama())
        True
    """
    return sorted({n.rsplit(".", 1)[-1] for n in find_targets(model, "all-linear")})
