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
- the SVD uses a local generator (``random_state``), never ``torch.manual_seed``.

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
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import LoraLayer
from torch import Tensor, nn

from loralab.core.gradients import estimate_gradients, resolve_targets
from loralab.core.targets import layer_kind, replace_module, to_storage_layout
from loralab.lora_sb.config import LoraSBConfig
from loralab.lora_sb.layer import custom_module_mapping, is_lora_sb_layer
from loralab.lora_sb.maths import update_approximation
from loralab.lora_sb.model import LoraSBInitError, initialize_from_updates_, lora_sb_layers

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
    ``quant_flag=True``: the estimate runs on a copy of the model whose bitsandbytes layers are float
    layers holding the weights the 4-bit layers actually apply (``loralab.core.quant.dequantize_weight``,
    right also after bitsandbytes repacks its CPU weights; in the layers' compute dtype). ``origin_type``
    (validated) and ``quant_type`` are accepted for compatibility: both are read from the layers. ``no_split_module_classes`` is used with offload only and
    is accepted for compatibility.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    update_approximation(torch.zeros(1), lr)  # validates lr with the native message
    est_model = model
    if quant_flag:
        if origin_type not in _DTYPES:
            raise ValueError(f"origin_type must be one of {sorted(_DTYPES)}, got {origin_type!r}")
        from loralab.lora_sb.model import _dequantized_twin

        est_model = _dequantized_twin(
            # base_model.model: the wrapped transformers model
            cast(nn.Module, model.base_model.model) if isinstance(model, PeftModel) else model
        )
    targets = resolve_targets(est_model, target_modules)
    out: dict[str, Tensor] = {}

    def consumer(name: str, grad: Tensor) -> None:
        out[f"{name}.weight"] = to_storage_layout(
            targets[name].module, update_approximation(grad, lr)
        ).contiguous()

    estimate_gradients(
        est_model,
        _first_samples(dataloader, num_samples),
        targets,
        loss_fn=loss_fn,
        consumer=consumer,
        progress=progress,
    )
    return out


def _sb_config_from(cfg: LoraConfig, svd_cfg: Mapping[str, Any]) -> LoraSBConfig:
    names = {f.name for f in dataclasses.fields(LoraSBConfig)}
    fields = {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names and f.init
    }
    fields.update(init_lora_weights=True, lora_sb=True, sb_init="gradient")
    for key, ours in (
        ("n_iter", "svd_niter"),
        ("niter", "svd_niter"),
        ("random_state", "init_seed"),
        ("seed", "init_seed"),
        ("oversample", "svd_oversample"),
    ):
        if key in svd_cfg and svd_cfg[key] is not None:
            fields[ours] = int(svd_cfg[key])
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


def find_and_initialize_grad(
    model: PeftModel,
    peft_config: Mapping[str, LoraConfig] | LoraConfig,
    adapter_name: str = "default",
    reconstr_type: str = "svd",
    reconstruct_config: Mapping[str, Any] | None = None,
    writer: Any = None,
    named_grads: Mapping[str, Tensor] | None = None,
) -> PeftModel:
    """Seed API: turn ``adapter_name``'s LoRA layers into LoRA-SB layers initialised from ``named_grads``.

    Args:
        model: a ``PeftModel`` with plain LoRA adapter ``adapter_name`` (from ``get_peft_model``).
        peft_config: ``{adapter_name: LoraConfig}`` (as the seed README) or the ``LoraConfig`` itself.
        reconstr_type: only ``"svd"`` exists.
        reconstruct_config: ``{"svd": {"rank": r, "n_iter": 10, "random_state": 42, ...}}``; ``rank``
            must equal the adapter's ``r``.
        writer: optional TensorBoard ``SummaryWriter``; the relative error of each layer's rank-r
            approximation is logged to it.
        named_grads: the output of :func:`estimate_and_process_grads_torch`, keys with or without the
            ``base_model.model.`` prefix.

    Returns the same model, its adapter now LoRA-SB (``model.peft_config[adapter_name]`` is a
    :class:`LoraSBConfig`, only the ``R`` matrices train).
    """
    if reconstr_type != "svd":
        raise ValueError(
            f"reconstr_type must be 'svd' (the only LoRA-SB reconstruction), got {reconstr_type!r}"
        )
    if named_grads is None:
        raise ValueError(
            "named_grads is required: pass the output of estimate_and_process_grads_torch(model, dataloader, lr)"
        )
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"model must be a PeftModel (call get_peft_model first), got {type(model).__name__}"
        )
    cfg: PeftConfig | None
    cfg = peft_config.get(adapter_name) if isinstance(peft_config, Mapping) else peft_config
    if cfg is None:
        cfg = model.peft_config.get(adapter_name)
    if not isinstance(cfg, LoraConfig):
        raise ValueError(f"no LoraConfig for adapter {adapter_name!r} in peft_config")
    svd_cfg = dict((reconstruct_config or {}).get("svd", {}) or {})
    rank = svd_cfg.get("rank", cfg.r)
    if rank != cfg.r:
        raise ValueError(
            f"reconstruct_config['svd']['rank']={rank} differs from the adapter's r={cfg.r}; set it to r"
        )
    sb_cfg = cfg if isinstance(cfg, LoraSBConfig) else _sb_config_from(cfg, svd_cfg)
    inner = cast(nn.Module, model.base_model.model)  # the wrapped transformers model
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
    updates: dict[str, Tensor] = {}
    for name, layer in layers.items():
        g = _update_for(named_grads, name)
        if g is None:
            raise LoraSBInitError(
                f"named_grads has no entry for LoRA-SB target {name!r} (looked for '{name}.weight' with and without 'base_model.model.')"
            )
        base = layer.get_base_layer()
        updates[name] = (g.T if layer_kind(base) == "conv1d" else g).float()
    initialize_from_updates_(model, updates, adapter_name=adapter_name)
    cast(LoraModel, model.base_model).set_adapter(adapter_name)  # a LoRA PeftModel's tuner
    if writer is not None:
        for name, layer in layers.items():  # (no autograd: R requires grad)
            delta = updates[name].to(cast(Tensor, layer.lora_R[adapter_name].weight).device)
            approx = layer.get_delta_weight(adapter_name).detach()
            approx = (approx.T if layer.fan_in_fan_out else approx).to(delta)
            rel = (delta - approx).norm() / delta.norm().clamp_min(1e-30)
            writer.add_scalar(f"lora_sb_init/{name}/relative_error", float(rel), 0)
    return model
