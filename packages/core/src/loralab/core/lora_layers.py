"""Find the (A, B) factor pairs of a PEFT LoRA model, paired by module, never by name order.

Every LoRA-aware optimizer (LoRA-FA, LoRA-Pro, …) needs, for each adapted layer, its down projection
``A`` (r, in), its up projection ``B`` (out, r) and the layer's scaling ``s`` (α/r, or α/√r with
rsLoRA, after ``rank_pattern``/``alpha_pattern``): PEFT stores exactly that per layer in
``lora_A[adapter]``, ``lora_B[adapter]`` and ``scaling[adapter]``, so we read it there.

Example:
    >>> import peft
    >>> from loralab.core.testing import tiny_llama
    >>> from loralab.core.lora_layers import find_lora_pairs
    >>> model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    >>> pairs = find_lora_pairs(model)
    >>> len(pairs), pairs[0].A.shape, pairs[0].scaling
    (2, torch.Size([4, 64]), 2.0)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["LoraPair", "LoraPairError", "find_lora_pairs", "lora_param_roles"]


class LoraPairError(ValueError):
    """A model has no LoRA layers, or a layer's factors are missing / not trainable as required."""


@dataclass(frozen=True)
class LoraPair:
    """One LoRA-adapted layer: ``W_eff = W0 + scaling · B @ A``."""

    name: str
    """Qualified name of the LoRA layer module (e.g. ``base_model.model.model.layers.0.self_attn.q_proj``)."""
    module: nn.Module
    """The PEFT ``LoraLayer``."""
    adapter: str
    """Adapter name (``"default"`` unless several adapters are loaded)."""
    A: Tensor
    """``lora_A[adapter].weight``, shape (r, in) (a Parameter; any leaf tensor
    for the seed APIs); for an embedding layer ``lora_embedding_A[adapter]``,
    shape (r, num_embeddings) (the layer is ``x ↦ onehot(x)·(W0 + s·B·A)ᵀ``, a Linear on one-hot inputs)."""
    B: Tensor
    """``lora_B[adapter].weight``, shape (out, r); for an embedding layer ``lora_embedding_B[adapter]``,
    shape (embedding_dim, r)."""
    scaling: float
    """The layer's own scaling (α/r, α/√r with rsLoRA; honours rank/alpha patterns)."""

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def _is_lora_layer(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("lora_A", "lora_B", "scaling")) and isinstance(
        module.lora_A, nn.ModuleDict
    )


def _embedding_adapters(module: nn.Module) -> list[str]:
    emb = getattr(module, "lora_embedding_A", None)
    return list(emb.keys()) if isinstance(emb, nn.ParameterDict) else []


def find_lora_pairs(
    model: nn.Module, adapter_name: str | None = None, *, embeddings: bool = False
) -> list[LoraPair]:
    """All LoRA (A, B) pairs of ``model`` for one adapter, in module order.

    Args:
        model: a ``PeftModel`` or any module containing PEFT ``LoraLayer``s (DDP / DeepSpeed
            wrappers are fine: modules are found wherever they are).
        adapter_name: which adapter; ``None`` takes the model's active adapter (or the only one).
        embeddings: also return the pairs of LoRA embedding layers (``lora_embedding_A`` /
            ``lora_embedding_B``, PEFT's ``nn.Parameter``s of shapes (r, num_embeddings) and
            (embedding_dim, r)). Off by default: a method opts in once its maths is checked for them.

    Raises:
        LoraPairError: the model has no LoRA layer (or, with ``embeddings=False``, only embedding
            LoRA layers: the message says so), or ``adapter_name`` is unknown (message lists the
            adapters found).

    Example:
        >>> # see the module docstring
    """
    pairs: list[LoraPair] = []
    seen_adapters: set[str] = set()
    skipped_embeddings: list[str] = []
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        if isinstance(active, str):
            adapter_name = active
        elif isinstance(active, (list, tuple)) and len(active) == 1:
            adapter_name = active[0]
    for name, module in model.named_modules():
        if not _is_lora_layer(module):
            continue
        emb_adapters = _embedding_adapters(module)
        if emb_adapters and not embeddings:
            skipped_embeddings.append(name)
            continue
        adapters = list(module.lora_A.keys()) + emb_adapters
        seen_adapters.update(adapters)
        adapter = adapter_name
        if adapter is None:
            if len(adapters) != 1:
                raise LoraPairError(
                    f"layer {name!r} has adapters {adapters}: pass adapter_name to pick one"
                )
            adapter = adapters[0]
        if adapter in emb_adapters:
            if adapter not in module.lora_embedding_B:
                raise LoraPairError(
                    f"layer {name!r} has lora_embedding_A[{adapter!r}] but no lora_embedding_B[{adapter!r}]"
                )
            pairs.append(
                LoraPair(
                    name=name,
                    module=module,
                    adapter=adapter,
                    A=module.lora_embedding_A[adapter],
                    B=module.lora_embedding_B[adapter],
                    scaling=float(module.scaling[adapter]),
                )
            )
            continue
        if adapter not in module.lora_A:
            continue
        if adapter not in module.lora_B:
            raise LoraPairError(
                f"layer {name!r} has lora_A[{adapter!r}] but no lora_B[{adapter!r}]"
            )
        pairs.append(
            LoraPair(
                name=name,
                module=module,
                adapter=adapter,
                A=module.lora_A[adapter].weight,
                B=module.lora_B[adapter].weight,
                scaling=float(module.scaling[adapter]),
            )
        )
    if not pairs:
        if skipped_embeddings and not seen_adapters:
            raise LoraPairError(
                f"{type(model).__name__}'s only LoRA layers are embeddings ({skipped_embeddings[:3]}"
                f"{' …' if len(skipped_embeddings) > 3 else ''}), which this method does not support: "
                "target Linear layers (LoraConfig(target_modules=[...]))"
            )
        if seen_adapters:
            raise LoraPairError(
                f"no LoRA layer has adapter {adapter_name!r}; adapters found: {sorted(seen_adapters)}"
            )
        raise LoraPairError(
            f"{type(model).__name__} has no PEFT LoRA layers: wrap it with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    return pairs


def lora_param_roles(pairs: Iterable[LoraPair]) -> dict[int, tuple[str, LoraPair]]:
    """Map ``id(parameter)`` → ``("A" | "B", pair)`` for quick lookups inside an optimizer."""
    roles: dict[int, tuple[str, LoraPair]] = {}
    for pair in pairs:
        roles[id(pair.A)] = ("A", pair)
        roles[id(pair.B)] = ("B", pair)
    return roles
