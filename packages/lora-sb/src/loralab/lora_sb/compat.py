"""The seed project's entry points (RaghavSinghal10/lora-sb ``utils``), thin, on top of the native API.

The seed README's quick start runs with its imports changed to ``loralab.lora_sb``, once its own
errors are fixed (see the package README, "Seed drop-in"): ``estimate_and_process_grads_torch`` needs
``lr``; ``find_and_initialize_grad`` (not ``find_and_initialize``) takes the ``peft_config`` dict (the
README passes an undefined ``lora_config``); ``utils.gradient utils`` is not a module name; ``yaml``
and ``torch`` are used without imports.

Differences from the seed, on purpose:

- gradients come from ``loralab.core.estimate_gradients`` (fp32 accumulation, all-reduced across
  ranks, eval mode so the estimate is deterministic; the seed ran in train mode with dropout on),
  for the adaptable layers only (the seed returned every trainable parameter, embeddings included);
- the layers become real :class:`~loralab.lora_sb.layer.LoraSBLinear` PEFT layers, and the adapter's
  config becomes a :class:`LoraSBConfig`, so ``save_pretrained`` / ``load_lora_sb_model`` /
  ``merge_and_unload`` work with clean keys (no monkey-patched ``forward``, no key mangling);
- the SVD uses a local generator (``random_state``), never ``torch.manual_seed``, and honours
  ``n_iter`` (the seed's SVD ignores both: 10 iterations after ``torch.manual_seed(42)``);
- every ``reconstruct_config`` key is honoured as the seed does (``r_squared=False``: plain LoRA;
  ``half_init_dec`` / ``replacement_module_random_init``: the seed's kaiming-uniform re-draws, from
  local generators) or refused with an error naming it (see :func:`find_and_initialize_grad`);
- ``R = Σ_r/s`` (the paper's init; the seed sets ``R = Σ_r``, the same at its scripts' ``lora_alpha = r``).

Example:
    >>> from peft import LoraConfig, get_peft_model
    >>> from loralab.core.testing import make_lm_batches, tiny_llama
    >>> from loralab.lora_sb import estimate_and_process_grads_torch, find_and_initialize_grad
    >>> model = tiny_llama()
    >>> named_grads = estimate_and_process_grads_torch(model, make_lm_batches(2), lr=1e-3, num_samples=4,
    ...                                                target_modules=["q_proj"], progress=False)
    >>> sorted(named_grads)
    ['model.layers.0.self_attn.q_proj.weight', 'model.layers.1.self_attn.q_proj.weight']
    >>> model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    >>> model = find_and_initialize_grad(model, model.peft_config, "default", "svd", {"svd": {"rank": 4}},
    ...                                  named_grads=named_grads)
    >>> type(model.peft_config["default"]).__name__, model.get_nb_trainable_parameters()[0]
    ('LoraSBConfig', 32)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTuner
from torch import Tensor, nn

from loralab.core.adapter_gradients import estimate_adapter_gradients
from loralab.core.gradients import estimate_gradients, resolve_targets
from loralab.core.linalg import SVDMethod, truncated_svd
from loralab.core.targets import layer_kind, replace_module, to_storage_layout
from loralab.lora_sb.config import _INCOMPATIBLE_FLAGS, LoraSBConfig
from loralab.lora_sb.layer import (
    custom_module_mapping,
    is_lora_sb_layer,
    layer_generator,
    set_sb_factors_,
)
from loralab.lora_sb.maths import update_approximation
from loralab.lora_sb.model import LoraSBInitError, initialize_from_updates_, lora_sb_layers

if TYPE_CHECKING:
    from loralab.lora_sb.layer import LoraSBLayerMixin, _LoraModule

__all__ = ["estimate_and_process_grads_torch", "find_and_initialize_grad"]

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _first_samples(
    dataloader: Iterable[Mapping[str, Any]], num_samples: int
) -> Iterator[dict[str, Any]]:
    seen = 0
    for batch in dataloader:
        if seen >= num_samples:
            return
        n = next(len(v) for v in batch.values() if isinstance(v, Tensor))
        take = min(n, num_samples - seen)
        yield {k: (v[:take] if isinstance(v, Tensor) else v) for k, v in batch.items()}
        seen += take


def estimate_and_process_grads_torch(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    lr: float,
    num_samples: int = 170,
    quant_flag: bool = False,
    origin_type: str = "bf16",
    quant_type: str = "nf4",
    no_split_module_classes: list[str] | None = None,
    *,
    target_modules: str | list[str] = "all-linear",
    loss_fn: Any = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Seed API: ``{"<layer>.weight": −lr·sign(mean gradient)}`` over the first ``num_samples`` samples.

    Values are in each weight's storage layout (Conv1D: (in, out)), as the seed returned them.
    ``quant_flag=True``: the estimate runs on the model itself (adapters off), its bitsandbytes target
    layers swapped for the estimate only for float layers holding the weights they actually apply
    (``loralab.core.quant.dequantize_weight``, right also after bitsandbytes repacks its CPU weights;
    in the layers' compute dtype): core's ``estimate_adapter_gradients``. ``origin_type``
    (validated) and ``quant_type`` are accepted for compatibility: both are read from the layers. ``no_split_module_classes`` is used with offload only and
    is accepted for compatibility.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    update_approximation(torch.zeros(1), lr)  # validates lr with the native message
    if quant_flag:
        if origin_type not in _DTYPES:
            raise ValueError(f"origin_type must be one of {sorted(_DTYPES)}, got {origin_type!r}")
        # names as in the un-wrapped model (a PeftModel's LoRA wrappers stand for their base layers)
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        targets = resolve_targets(base, target_modules)
    else:
        targets = resolve_targets(model, target_modules)
    out: dict[str, Tensor] = {}

    def consumer(name: str, grad: Tensor) -> None:
        out[f"{name}.weight"] = to_storage_layout(
            targets[name].module, update_approximation(grad, lr)
        ).contiguous()

    if quant_flag:
        # core's adapter estimation: adapters off, quantized targets on float copies of their
        # dequantized weights (in their compute dtype), at the quantized model's own point
        estimate_adapter_gradients(
            model,
            _first_samples(dataloader, num_samples),
            consumer,
            layer_names=list(targets),
            loss_fn=loss_fn,
            progress=progress,
        )
    else:
        estimate_gradients(
            model,
            _first_samples(dataloader, num_samples),
            targets,
            loss_fn=loss_fn,
            consumer=consumer,
            progress=progress,
        )
    return out


# --- find_and_initialize_grad: the seed's reconstruct_config ------------------------------------------
#
# The seed's config/reconstruct_config.yaml (inherited from LoRA-XS) and what its find_and_initialize_grad
# does with each key (its utils/initialization_utils.py; the same function ships in the authors' Fed-SB code):
#   reconstruction_type: "svd"      not read by find_and_initialize_grad (the reconstr_type argument is)
#   reconstr_mode: "separated"      anything else raises NotImplementedError
#   half_init_dec: False            True: kaiming-uniform re-init of the lower half of the decoder (B)
#   replacement_module_random_init: False   True: kaiming-uniform re-init of encoder (A) and decoder (B)
#   r_squared: True                 False: no R; plain LoRA with B from the SVD and A ~ N(0, 1e-5²)
#   svd: {rank, n_iter, random_state}   rank = the SVD rank; the seed's SVD ignores n_iter and
#                                       random_state (always niter=10 after torch.manual_seed(42))
_SEED_DEFAULTS: dict[str, Any] = {
    "reconstr_mode": "separated",
    "half_init_dec": False,
    "replacement_module_random_init": False,
    "r_squared": True,
}
_TOP_KEYS = ("reconstruction_type", "svd", *_SEED_DEFAULTS)
# the seed's three, plus loralab's SVD settings (LoraSBConfig.svd_oversample / svd_method)
_SVD_KEYS = ("rank", "n_iter", "random_state", "oversample", "method")
_KEY_HINTS = {
    "learn_diagonal_only": "it is an option of LoRA-XS's find_and_initialize_lora_xs, not of LoRA-SB",
}
# seed (r_squared=False): init_module_weights(lora_A, sigma=0.00001)
_PLAIN_A_STD = 1e-5
# init_lora_weights values with which PEFT rewrites the base weight while it builds the layers
_W0_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclasses.dataclass(frozen=True)
class _SeedInit:
    """The validated ``reconstruct_config``."""

    r_squared: bool
    half_init_dec: bool
    random_init: bool
    rank: int | None
    niter: int | None
    seed: int | None
    oversample: int | None
    method: SVDMethod | None


def _int_or_none(where: str, value: Any, minimum: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {value}")
    return value


def _parse_reconstruct_config(config: Mapping[str, Any] | None, reconstr_type: str) -> _SeedInit:
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise TypeError(
            f"reconstruct_config must be a dict (the seed's reconstruct_config.yaml), got {type(config).__name__}"
        )
    unknown = sorted(set(config) - set(_TOP_KEYS))
    if unknown:
        hints = "".join(f"; {k}: {_KEY_HINTS[k]}" for k in unknown if k in _KEY_HINTS)
        raise ValueError(
            f"reconstruct_config has unknown key(s) {unknown}{hints}. find_and_initialize_grad reads "
            f"{list(_TOP_KEYS)} (the seed's reconstruct_config.yaml)"
        )
    rt = config.get("reconstruction_type", reconstr_type)
    if rt != reconstr_type:
        raise ValueError(
            f"reconstruct_config['reconstruction_type']={rt!r} contradicts reconstr_type={reconstr_type!r}"
        )
    mode = config.get("reconstr_mode", _SEED_DEFAULTS["reconstr_mode"])
    if mode != "separated":
        raise ValueError(
            "reconstruct_config['reconstr_mode'] must be 'separated', the only mode the seed implements "
            f"(it raises NotImplementedError for any other), got {mode!r}"
        )
    flags = {}
    for key in ("half_init_dec", "replacement_module_random_init", "r_squared"):
        value = config.get(key, _SEED_DEFAULTS[key])
        if not isinstance(value, bool):
            raise ValueError(f"reconstruct_config[{key!r}] must be True or False, got {value!r}")
        flags[key] = value
    svd = config.get("svd") or {}
    if not isinstance(svd, Mapping):
        raise TypeError(f"reconstruct_config['svd'] must be a dict, got {type(svd).__name__}")
    unknown = sorted(set(svd) - set(_SVD_KEYS))
    if unknown:
        raise ValueError(
            f"reconstruct_config['svd'] has unknown key(s) {unknown}; it reads {list(_SVD_KEYS)}"
        )
    method = svd.get("method")
    if method not in (None, "auto", "full", "randomized"):
        raise ValueError(
            f"reconstruct_config['svd']['method'] must be 'auto', 'full' or 'randomized', got {method!r}"
        )
    return _SeedInit(
        r_squared=flags["r_squared"],
        half_init_dec=flags["half_init_dec"],
        random_init=flags["replacement_module_random_init"],
        rank=_int_or_none("reconstruct_config['svd']['rank']", svd.get("rank"), 1),
        niter=_int_or_none("reconstruct_config['svd']['n_iter']", svd.get("n_iter"), 0),
        seed=_int_or_none("reconstruct_config['svd']['random_state']", svd.get("random_state")),
        oversample=_int_or_none(
            "reconstruct_config['svd']['oversample']", svd.get("oversample"), 0
        ),
        method=method,
    )


def _check_adapter_config(cfg: LoraConfig) -> None:
    """Refuse adapter settings that re-initialising A and B (as the seed does) would silently break."""
    init = cfg.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_W0_INITS):
        raise ValueError(
            f"init_lora_weights={init!r} cannot be used with find_and_initialize_grad: with it PEFT rewrites the "
            "base weights (W0 - s·B·A) while building the layers, and re-initialising A and B afterwards (as the "
            "seed does) would leave that modified W0 in the model. Build the LoRA adapter with "
            "init_lora_weights=True (the default)"
        )
    for flag in _INCOMPATIBLE_FLAGS:
        if getattr(cfg, flag, None):
            raise ValueError(
                f"find_and_initialize_grad re-initialises plain LoRA A/B factors; the adapter sets "
                f"{flag}={getattr(cfg, flag)!r}, which is not plain LoRA. Unset it"
            )


def _sb_config_from(cfg: LoraConfig, seed: _SeedInit) -> LoraSBConfig:
    names = {f.name for f in dataclasses.fields(LoraSBConfig)}
    fields = {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names and f.init
    }
    fields.update(init_lora_weights=True, lora_sb=True, sb_init="gradient")
    for ours, value in (
        ("svd_niter", seed.niter),
        ("init_seed", seed.seed),
        ("svd_oversample", seed.oversample),
        ("svd_method", seed.method),
    ):
        if value is not None:
            fields[ours] = value
    return LoraSBConfig(**fields)


def _update_for(named_grads: Mapping[str, Tensor], name: str) -> Tensor | None:
    for key in (
        f"base_model.model.{name}.weight",
        f"{name}.weight",
        f"base_model.model.{name}.base_layer.weight",
        f"{name}.base_layer.weight",
    ):
        if key in named_grads:
            return named_grads[key]
    return None


def _update_matrix(named_grads: Mapping[str, Tensor], name: str, layer: LoraLayer) -> Tensor:
    """``ΔW̃`` of layer ``name`` as an (out, in) float32 matrix (``named_grads`` holds storage layouts)."""
    g = _update_for(named_grads, name)
    if g is None:
        raise LoraSBInitError(
            f"named_grads has no entry for target {name!r} (looked for '{name}.weight' with and without "
            "'base_model.model.')"
        )
    base = layer.get_base_layer()
    return (g.T if layer_kind(base) == "conv1d" else g).float()


def _kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """``torch.nn.init.kaiming_uniform_(w, a=√5)`` on a (rows, cols) matrix, as the seed calls it:
    U(−1/√fan_in, 1/√fan_in) with fan_in = cols (gain √(2/(1+5)), bound = gain·√3/√fan_in)."""
    bound = 1.0 / math.sqrt(cols)
    return (
        (torch.rand(rows, cols, generator=generator, dtype=torch.float64) * 2 - 1)
        .mul_(bound)
        .float()
    )


def _seed_random_factors(
    B: Tensor, A: Tensor, seed: _SeedInit, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The seed's random replacements of the SVD factors ``B`` (m×r, its decoder transposed) and ``A``
    (r×n, its encoder transposed): ``half_init_dec`` re-draws the last ⌊r/2⌋ columns of B (rows
    ⌈r/2⌉: of the r×m decoder, fan_in m); ``replacement_module_random_init`` re-draws all of A (the
    n×r encoder, fan_in r) and B (fan_in m), in that order, so it overrides ``half_init_dec``."""
    m, r = B.shape
    n = A.shape[1]
    B, A = B.clone(), A.clone()
    if seed.half_init_dec:
        h = math.ceil(r / 2)
        B[:, h:] = _kaiming_uniform(r - h, m, generator).T.to(B)
    if seed.random_init:
        A = _kaiming_uniform(n, r, generator).T.to(A)
        B = _kaiming_uniform(r, m, generator).T.to(B)
    return B, A


def _random_generator(seed: int, name: str) -> torch.Generator:
    # independent of the SVD sketch's generator (layer_generator(seed, name)), reproducible per layer
    return layer_generator(seed, f"{name}#seed-random-init")


def _wrapped(model: PeftModel) -> nn.Module:
    return cast(nn.Module, model.base_model.model)  # the wrapped transformers model


def _check_factor_slots(model: PeftModel, adapter_name: str) -> None:
    """Refuse layers that host the adapter outside lora_A/lora_B (embedding, conv): the seed's init
    re-initialises Linear factors only, and skipping them would leave them silently untouched."""
    for name, module in _wrapped(model).named_modules():
        if (
            isinstance(module, LoraLayer)
            and adapter_name in getattr(module, "r", {})
            and adapter_name not in module.lora_A
        ):
            raise TypeError(
                f"find_and_initialize_grad initialises Linear LoRA factors; layer {name!r} "
                f"({type(module).__name__}) hosts adapter {adapter_name!r} otherwise (e.g. an embedding). "
                "Exclude it from target_modules"
            )


def _to_lora_sb_(
    model: PeftModel,
    adapter_name: str,
    cfg: LoraConfig,
    seed: _SeedInit,
    named_grads: Mapping[str, Tensor],
) -> dict[str, LoraSBLayerMixin]:
    """``r_squared=True``: turn the adapter's LoRA layers into LoRA-SB layers initialised from the SVD."""
    sb_cfg = _sb_config_from(cfg, seed)
    inner = _wrapped(model)
    mapping = custom_module_mapping()
    for name, module in list(inner.named_modules()):
        if (
            not isinstance(module, LoraLayer)
            or adapter_name not in module.lora_A
            or is_lora_sb_layer(module, adapter_name)
        ):
            continue
        others = [a for a in module.lora_A if a != adapter_name]
        if others:
            raise ValueError(
                f"layer {name!r} also hosts adapters {others}; convert it before adding other adapters"
            )
        base = module.get_base_layer()
        cls = next((c for k, c in mapping.items() if isinstance(base, k)), None)
        if cls is None or layer_kind(base) is None:
            raise TypeError(f"LoRA-SB cannot adapt layer {name!r} ({type(base).__name__})")
        new = cls(
            base,
            adapter_name,
            config=sb_cfg,
            r=module.r[adapter_name],
            lora_alpha=module.lora_alpha[adapter_name],
            target_name=name,
        )
        replace_module(inner, name, new)
    model.peft_config[adapter_name] = sb_cfg
    layers = lora_sb_layers(model, adapter_name)
    updates = {name: _update_matrix(named_grads, name, layer) for name, layer in layers.items()}
    initialize_from_updates_(model, updates, adapter_name=adapter_name)
    if seed.half_init_dec or seed.random_init:
        with torch.no_grad():
            for name, layer in layers.items():
                # the factors are nn.Linear layers (LoRA-SB hosts Linear-type layers only)
                A = cast(Tensor, layer.lora_A[adapter_name].weight).float()
                B = cast(Tensor, layer.lora_B[adapter_name].weight).float()
                R = cast(Tensor, layer.lora_R[adapter_name].weight).detach().clone()
                B, A = _seed_random_factors(B, A, seed, _random_generator(sb_cfg.init_seed, name))
                set_sb_factors_(layer, adapter_name, B, R, A)
    return layers


@torch.no_grad()
def _plain_lora_init_(
    model: PeftModel,
    adapter_name: str,
    cfg: LoraConfig,
    seed: _SeedInit,
    named_grads: Mapping[str, Tensor],
) -> dict[str, _LoraModule]:
    """``r_squared=False`` (the seed's plain-LoRA branch): no R; ``B = U_r`` of ``ΔW̃`` (after the seed's
    optional random replacements), ``A ~ N(0, 1e-5²)``; A and B both train, the adapter stays a plain
    PEFT LoRA adapter (its checkpoint loads with bare PEFT)."""
    if isinstance(cfg, LoraSBConfig):
        raise ValueError(
            f"reconstruct_config['r_squared']=False makes adapter {adapter_name!r} a plain LoRA adapter, but it "
            "is a LoRA-SB adapter (LoraSBConfig); build it with peft.LoraConfig"
        )
    init_seed = 0 if seed.seed is None else seed.seed
    layers: dict[str, _LoraModule] = {}
    for name, module in _wrapped(model).named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        lora_A, lora_B = module.lora_A[adapter_name], module.lora_B[adapter_name]
        if not (isinstance(lora_A, nn.Linear) and isinstance(lora_B, nn.Linear)):
            raise TypeError(
                f"find_and_initialize_grad re-initialises Linear LoRA factors; layer {name!r} has "
                f"{type(lora_A).__name__} factors"
            )
        delta = _update_matrix(named_grads, name, module)
        r, m, n = module.r[adapter_name], lora_B.out_features, lora_A.in_features
        if tuple(delta.shape) != (m, n):
            raise LoraSBInitError(
                f"update for {name!r} has shape {tuple(delta.shape)}, expected (out, in) = {(m, n)}"
            )
        if not torch.isfinite(delta).all():
            raise LoraSBInitError(f"update for {name!r} has NaN/Inf entries")
        if not bool(delta.any()):
            raise LoraSBInitError(
                f"the update approximation of layer {name!r} is all zeros (its gradient is exactly zero); "
                "exclude it from target_modules"
            )
        B, _, _ = truncated_svd(
            delta,
            r,
            method=seed.method or "auto",
            oversample=10 if seed.oversample is None else seed.oversample,
            niter=10 if seed.niter is None else seed.niter,
            generator=layer_generator(init_seed, name),
        )
        gen = _random_generator(init_seed, name)
        B, _ = _seed_random_factors(B, torch.zeros(r, n), seed, gen)
        A = torch.randn(r, n, generator=gen, dtype=torch.float64).mul_(_PLAIN_A_STD)
        lora_A.weight.copy_(A.to(lora_A.weight))
        lora_B.weight.copy_(B.to(lora_B.weight))
        # a PEFT LoRA layer with nn.Linear factors (checked above): a Linear-type host
        layers[name] = cast("_LoraModule", module)
    return layers


def find_and_initialize_grad(
    model: PeftModel,
    peft_config: Mapping[str, LoraConfig] | LoraConfig,
    adapter_name: str = "default",
    reconstr_type: str = "svd",
    reconstruct_config: Mapping[str, Any] | None = None,
    writer: Any = None,
    named_grads: Mapping[str, Tensor] | None = None,
) -> PeftModel:
    """Seed API: initialise ``adapter_name``'s LoRA layers from ``named_grads`` (LoRA-SB by default).

    Args:
        model: a ``PeftModel`` with plain LoRA adapter ``adapter_name`` (from ``get_peft_model``).
        peft_config: ``{adapter_name: LoraConfig}`` (as the seed README) or the ``LoraConfig`` itself.
        reconstr_type: only ``"svd"`` exists.
        reconstruct_config: the seed's ``reconstruct_config.yaml`` as a dict; every key is honoured
            as the seed does, or refused (missing keys take the seed's YAML values):

            - ``r_squared`` (True): LoRA-SB, ``B = U_r``, ``R = Σ_r/s``, ``A = V_rᵀ`` and only R
              trains. False: the seed's plain LoRA, no R, ``B = U_r``, ``A ~ N(0, 1e-5²)``, A and B
              train, the adapter stays a ``LoraConfig`` adapter.
            - ``half_init_dec`` (False): B's last ⌊r/2⌋ columns re-drawn ``U(±1/√out)``.
            - ``replacement_module_random_init`` (False): A re-drawn ``U(±1/√r)`` and B
              ``U(±1/√out)`` (overrides ``half_init_dec``); R keeps ``Σ_r/s``.
            - ``reconstr_mode``: only ``"separated"`` (the seed raises on anything else);
              ``reconstruction_type``: must agree with ``reconstr_type``.
            - ``svd``: ``rank`` must equal the adapter's ``r``; ``n_iter`` and ``random_state`` set
              the SVD's power iterations and the seed of its local generator (the seed ignores both:
              always 10 iterations after ``torch.manual_seed(42)``); loralab's ``oversample`` and
              ``method`` are :class:`LoraSBConfig`'s ``svd_oversample`` / ``svd_method``.

            Random draws come from local generators seeded by ``random_state`` and the layer name
            (the seed uses the global RNG), so they match the seed in distribution, not in value.
        writer: optional TensorBoard ``SummaryWriter``; the relative error of each layer's initial
            ``ΔW`` against ``ΔW̃`` is logged to it (the seed accepts and ignores it).
        named_grads: the output of :func:`estimate_and_process_grads_torch`, keys with or without the
            ``base_model.model.`` prefix.

    Returns the same model. With ``r_squared`` its adapter is LoRA-SB (``model.peft_config[adapter_name]``
    is a :class:`LoraSBConfig`, only the ``R`` matrices train).
    """
    if reconstr_type != "svd":
        raise ValueError(
            f"reconstr_type must be 'svd' (the only LoRA-SB reconstruction), got {reconstr_type!r}"
        )
    seed = _parse_reconstruct_config(reconstruct_config, reconstr_type)
    if named_grads is None:
        raise ValueError(
            "named_grads is required: pass the output of estimate_and_process_grads_torch(model, dataloader, lr)"
        )
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"model must be a PeftModel (call get_peft_model first), got {type(model).__name__}"
        )
    cfg: PeftConfig | None = (
        peft_config.get(adapter_name) if isinstance(peft_config, Mapping) else peft_config
    )
    if cfg is None:
        cfg = model.peft_config.get(adapter_name)
    if not isinstance(cfg, LoraConfig):
        raise ValueError(f"no LoraConfig for adapter {adapter_name!r} in peft_config")
    rank = cfg.r if seed.rank is None else seed.rank
    if rank != cfg.r:
        raise ValueError(
            f"reconstruct_config['svd']['rank']={rank} differs from the adapter's r={cfg.r}; set it to r "
            f"(the seed would put rank-{rank} factors into a rank-{cfg.r} adapter: its scaling lora_alpha/r and "
            "its saved adapter_config.json keep r, so the checkpoint would not reload)"
        )
    _check_adapter_config(cfg)
    _check_factor_slots(model, adapter_name)
    layers: Mapping[str, _LoraModule]
    if seed.r_squared:
        layers = _to_lora_sb_(model, adapter_name, cfg, seed, named_grads)
    else:
        layers = _plain_lora_init_(model, adapter_name, cfg, seed, named_grads)
    cast(BaseTuner, model.base_model).set_adapter(adapter_name)  # get_peft_model's tuner
    if writer is not None:
        for name, layer in layers.items():
            with torch.no_grad():
                delta = _update_matrix(named_grads, name, layer)
                approx = layer.get_delta_weight(adapter_name).detach()
                approx = (approx.T if layer.fan_in_fan_out else approx).to(delta)
                rel = (delta - approx).norm() / delta.norm().clamp_min(1e-30)
            writer.add_scalar(f"lora_sb_init/{name}/relative_error", float(rel), 0)
    return model
