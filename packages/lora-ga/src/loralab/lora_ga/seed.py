"""Drop-in for the seed project's API (Outsider565/LoRA-GA, ``peft.utils.lora_ga_utils``).

The seed's quick start runs with only its import lines changed::

    from peft import PeftModel, get_peft_model
    from loralab.lora_ga import LoraGAConfig, estimate_gradient, LoraGAContext
    from loralab.lora_ga import save_loraga_model_init, save_loraga_model_final

    peft_config = LoraGAConfig()
    named_grad = estimate_gradient(model=model, dataloader=dataloader, accelerator=accelerator, quant_flag=False)
    with LoraGAContext(model=model, named_grad=named_grad):
        model = get_peft_model(model=model, peft_config=peft_config)
    save_loraga_model_init(model, save_dir=save_dir)
    ...  # train
    save_loraga_model_final(model, save_dir=save_dir)

What is the same as the seed and what is not:

- :func:`estimate_gradient` returns ``{module name: mean gradient}`` like the seed, but as float32
  (out, in) matrices of the adaptable layers only (the seed keeps every parameter's gradient, in the
  parameter dtype, and writes a layer's bias gradient under its weight's key). It is
  :func:`loralab.core.estimate_gradients`; ``quant_flag=True`` is core's block offload (one decoder
  block at a time on the accelerator), and the mean is all-reduced across processes through the
  ``accelerator`` (the seed's ``all_reduce(AVG)``), so every rank initialises identically. It runs the
  model in eval mode (dropout off, a deterministic estimate); the seed used train mode (pass
  ``train=True``).
- :class:`LoraGAContext` makes plain ``peft.get_peft_model(model, LoraGAConfig(...))`` build a
  LoRA-GA model: the LoRA-GA layers PEFT builds for a ``LoraGAConfig`` (:mod:`loralab.lora_ga.layer`,
  chosen through PEFT's custom-module dispatch) report to the context, which checks every target
  first and then writes each layer's ``A``, ``B`` and offset ``W0`` as soon as PEFT has finished it,
  with the same code as :func:`~loralab.lora_ga.get_lora_ga_model`. Used without gradients, or with a gradient dict
  that misses a target or has one of the wrong shape, it raises (never PEFT's silent fallback to the
  default init), and the model is given back unchanged.
- DeepSpeed ZeRO-3: a model partitioned by ``deepspeed.zero.Init`` (or transformers' ZeRO-3 loading)
  is estimated one decoder block at a time (core's block-wise order: only that block's partitions,
  or the embeddings and head while they run, are gathered; never the whole model), and the init
  writes the offset ``W0`` through ``GatheredParameters`` one layer at a time; every rank needs the
  same number of batches; estimate before ``deepspeed.initialize`` (an engine is refused).
- The save helpers keep the seed's layout (``save_dir/init_lora_checkpoint`` is written first and
  removed by the final save), and the final adapter is a plain PEFT LoRA (rank 2r) that loads on the
  original, unmodified base model.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from torch import Tensor, nn

from loralab.core.distributed import gathered_parameters, is_main_process
from loralab.core.gradients import estimate_gradients
from loralab.core.linalg import SVDMethod
from loralab.core.quant import dequantize_weight, requantize_weight_
from loralab.core.targets import layer_kind
from loralab.lora_ga.config import DTYPES
from loralab.lora_ga.layer import LoraGAInitError, Pending, is_lora_ga_layer, lora_ga_session
from loralab.lora_ga.maths import LoraGARankError, offset_weight
from loralab.lora_ga.model import _out_in, factors_for, write_lora_ga_layer
from loralab.lora_ga.save import plain_lora_config, save_lora_ga_adapter

__all__ = [
    "INIT_SUBDIR",
    "LoraGAContext",
    "estimate_gradient",
    "save_loraga_model_final",
    "save_loraga_model_init",
]

logger = logging.getLogger(__name__)

# The seed's offload split its model into K chunks with K = bits(origin_type) / bits(quant_type).
# loralab's offload streams one decoder block at a time whatever the types; they are only checked.
ORIGIN_TYPES = ("bf16", "fp16", "fp32")
QUANT_TYPES = ("nf4", "fp4", "int8")


def _prepared(dataloader: Iterable[Any], accelerator: Any) -> Iterable[Any]:
    """Shard the dataloader across processes as the seed does (``accelerator.prepare``), once."""
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

    if isinstance(dataloader, (DataLoaderShard, DataLoaderDispatcher)):
        return dataloader  # already prepared
    if isinstance(dataloader, torch.utils.data.DataLoader):
        return accelerator.prepare_data_loader(dataloader)
    return dataloader  # a plain iterable of batches: the caller gives each process its own


def estimate_gradient(
    model: nn.Module,
    dataloader: Iterable[Any],
    accelerator: Any = None,
    quant_flag: bool = False,
    origin_type: str = "bf16",
    quant_type: str = "nf4",
    no_split_module_classes: Sequence[str] | None = None,
    *,
    targets: str | Sequence[str] = "all-linear",
    num_batches: int | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    train: bool = False,
    progress: bool = True,
) -> dict[str, Tensor]:
    """The seed's ``estimate_gradient``: the mean gradient of every adaptable layer over ``dataloader``.

    Args:
        model: a float model (for a quantized model, estimate on a float copy of the same checkpoint,
            see :func:`loralab.core.quant.load_float_model_for_estimation`, and pass ``quant_flag=True``).
        dataloader: a ``DataLoader`` (or any iterable) of batches ``model(**batch)`` accepts, with
            ``labels`` (or pass ``loss_fn``).
        accelerator: an ``accelerate.Accelerator`` or ``None``. With one, the model is moved to its
            device (``quant_flag=False``), a ``DataLoader`` is sharded across processes with
            ``accelerator.prepare_data_loader`` unless it already is, and the per-process means are
            averaged across processes with ``accelerator.reduce``.
        quant_flag: estimate block by block (core's offload: weights stay on the CPU, one decoder block at
            a time on the accelerator's device), the seed's flow before initialising a quantized model.
        origin_type: the float model's dtype in the seed (``"bf16"``, ``"fp16"``, ``"fp32"``); checked only.
        quant_type: the target quantization in the seed (``"nf4"``, ``"fp4"``, ``"int8"``); checked only.
        no_split_module_classes: decoder block class names for the offload (defaults per architecture).
        targets: which layers (``"all-linear"`` = every Linear/Conv1D except heads, or names/regex as
            ``peft.LoraConfig.target_modules``); must cover the config's targets.
        num_batches: use at most this many batches (default: all).
        loss_fn: ``loss_fn(model, batch) -> loss`` for batches without labels.
        train: train mode (dropout on) during the estimate, as the seed; default eval mode.
        progress: tqdm bar on the main process.

    Returns:
        ``{module name: (out, in) float32 mean gradient}`` on the CPU, identical on every process.

    Raises:
        GradientEstimationError: a quantized model (estimate on the float checkpoint), no batches,
            unused layers, non-finite gradients.
        ValueError: an unknown ``origin_type`` / ``quant_type``.

    Example:
        >>> from loralab.core.testing import tiny_llama, make_lm_batches
        >>> from loralab.lora_ga import estimate_gradient
        >>> named_grad = estimate_gradient(tiny_llama(), make_lm_batches(2), None, progress=False)
        >>> named_grad["model.layers.0.self_attn.q_proj"].shape
        torch.Size([64, 64])
    """
    if origin_type not in ORIGIN_TYPES:
        raise ValueError(f"origin_type must be one of {ORIGIN_TYPES}, got {origin_type!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if isinstance(model, PeftModel):
        raise TypeError(
            "estimate_gradient needs the base model (before get_peft_model), got a PeftModel"
        )
    _check_not_deepspeed_engine(model)
    device = None
    multi = False
    if accelerator is not None:
        dataloader = _prepared(dataloader, accelerator)
        multi = accelerator.num_processes > 1
        if quant_flag:
            device = accelerator.device
        else:
            model.to(accelerator.device)
    # DeepSpeed ZeRO-3 (a model built under deepspeed.zero.Init / HF's zero3 loading): every rank
    # holds a slice of each weight; core's estimate gathers one decoder block at a time (the seed
    # gathered the whole model); the init writes go through GatheredParameters, one layer at a time.
    grads = estimate_gradients(
        model,
        dataloader,
        targets,
        num_batches=num_batches,
        loss_fn=loss_fn,
        offload=quant_flag,
        device=device,
        no_split_module_classes=no_split_module_classes,
        train=train,
        # With an accelerator the mean goes through accelerate (below); otherwise core reduces over
        # torch.distributed when it is initialised (torchrun), a no-op in one process.
        reduce=not multi,
        progress=progress,
    )
    out: dict[str, Tensor] = {}
    for name in list(grads):  # the same (module) order on every rank, as the all-reduce requires
        g = grads.pop(name)
        if multi:
            g = accelerator.reduce(g.to(accelerator.device), reduction="mean")
        out[name] = g.to("cpu")
        del g
    return out


def _check_not_deepspeed_engine(model: nn.Module) -> None:
    """A DeepSpeed engine (or a module it hooked) partitions gradients itself: estimate before ``deepspeed.initialize``."""
    hooked = type(model).__name__ == "DeepSpeedEngine" or any(
        hasattr(m, "ds_id") for m in model.modules()
    )
    if hooked:
        raise TypeError(
            "estimate_gradient got a model already wrapped by deepspeed.initialize (its ZeRO hooks partition and reduce "
            "the gradients): estimate on the model before deepspeed.initialize / accelerator.prepare (a ZeRO-3 model "
            "built under deepspeed.zero.Init is fine: it is estimated one gathered block at a time), then get_peft_model "
            "inside LoraGAContext, then initialize DeepSpeed"
        )


class LoraGAContext:
    """Inside this block, ``peft.get_peft_model(model, LoraGAConfig(...))`` builds a LoRA-GA model from ``named_grad``.

    When PEFT builds the first LoRA layer of a :class:`~loralab.lora_ga.LoraGAConfig`, every target
    of the config is checked against ``named_grad`` (present, (out, in)-shaped, finite, rank
    ``2r <= min(m, n)``); then each layer gets LoRA-GA's ``A``, ``B`` and offset ``W0`` as soon as
    PEFT has finished it (the same code as :func:`~loralab.lora_ga.get_lora_ga_model`). ``model.named_grad`` is set for the duration, as the
    seed does.

    Args:
        model: the base model that is passed to ``get_peft_model`` inside the block (float or
            bitsandbytes-quantized: quantized weights are dequantized, offset and re-quantized with
            their own quant type).
        named_grad: ``{module name: (out, in) gradient}`` from :func:`estimate_gradient` (names as in
            ``model.named_modules()``).
        svd_method: ``"auto"`` (the seed's randomized SVD, exact for small matrices), ``"full"`` or
            ``"randomized"``.

    Raises:
        LoraGAInitError: ``named_grad`` is ``None``/empty, misses a target layer, or has a gradient of
            the wrong shape. ``LoraGARankError``: ``2r > min(m, n)`` for a layer. On any of these the
            model is restored to its state before ``get_peft_model``.

    Example:
        >>> import peft
        >>> from loralab.core.testing import tiny_llama, make_lm_batches
        >>> from loralab.lora_ga import LoraGAConfig, LoraGAContext, estimate_gradient
        >>> model = tiny_llama()
        >>> named_grad = estimate_gradient(model, make_lm_batches(2), None, progress=False)
        >>> with LoraGAContext(model=model, named_grad=named_grad):
        ...     model = peft.get_peft_model(model, LoraGAConfig(r=4, target_modules=["q_proj"]))
        >>> float(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.detach().abs().sum()) > 0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        named_grad: Mapping[str, Tensor] | None = None,
        *,
        svd_method: SVDMethod = "auto",
    ) -> None:
        self.model = model
        self.named_grad = named_grad
        self.svd_method = svd_method
        self._session: Any = None
        self._session_cm: Any = None
        self._written: list[Pending] = []
        self._checked: set[int] = set()
        self._failed = False

    # -- names -------------------------------------------------------------------------------------
    def _name_of(self, layer: LoraLayer) -> str:
        """The module name (in ``model``) of the layer PEFT is adapting."""
        name = self._names.get(id(layer.get_base_layer()))
        if name is None:
            name = self._names.get(id(layer))
        if name is None:
            raise LoraGAInitError(
                f"a LoRA-GA layer ({type(layer.get_base_layer()).__name__}) is being created on a module that is not part "
                "of the model given to LoraGAContext: pass the same model to LoraGAContext and get_peft_model"
            )
        return name

    def _validate(self, name: str, base: nn.Module, r: int) -> None:
        """The checks of one target layer (gradient present, (out, in)-shaped, finite; ``2r <= min(m, n)``)."""
        grads = self.named_grad
        assert grads is not None
        if name not in grads:
            raise LoraGAInitError(
                f"named_grad has no gradient for target layer {name!r} (it has {len(grads)} entries, e.g. "
                f"{next(iter(grads))!r}): estimate with targets covering the config's target_modules"
            )
        expected = _out_in(base)
        got = tuple(grads[name].shape)
        if got != expected:
            hint = (
                " (Conv1D: pass the (out, in) gradient, i.e. weight.grad transposed)"
                if got == expected[::-1]
                else ""
            )
            raise LoraGAInitError(
                f"named_grad[{name!r}] must have shape (out, in) = {expected}, got {got}{hint}"
            )
        m, n = expected
        if 2 * r > min(m, n):
            raise LoraGARankError(
                f"layer {name!r} ({m}x{n}): LoRA-GA needs 2r = {2 * r} singular vectors but the gradient has only "
                f"min(m, n) = {min(m, n)}; use r <= {min(m, n) // 2} for this layer (rank_pattern) or exclude it"
            )
        if not torch.isfinite(grads[name]).all():
            raise LoraGAInitError(f"named_grad[{name!r}] has non-finite values (NaN/Inf)")

    def _check_all_targets(self, config: Any) -> None:
        """Every layer PEFT will adapt with ``config``, checked before the first one is written.

        The layers are written one by one as PEFT builds them, so a failure on a later layer must be
        caught here for the model to be given back unchanged. Uses PEFT's own target matching and
        ``rank_pattern`` lookup, on the (already expanded) config PEFT hands to the layers.
        """
        from peft.tuners.lora.model import LoraModel
        from peft.utils.other import get_pattern_key

        inside: list[str] = []
        for name, mod in self._modules.items():
            if any(name.startswith(prefix) for prefix in inside):
                continue  # parts of a LoRA layer that existed before
            if isinstance(mod, LoraLayer):
                inside.append(name + ".")
            if not name or not LoraModel._check_target_module_exists(config, name):
                continue
            key = self._names.get(id(mod), name)
            base = mod.get_base_layer() if isinstance(mod, LoraLayer) else mod
            if isinstance(mod, LoraLayer) and not is_lora_ga_layer(mod):
                raise LoraGAInitError(
                    f"target layer {key!r} already holds PEFT LoRA adapters ({', '.join(mod.lora_A)}) in a plain PEFT "
                    "layer, which would silently keep PEFT's default init for a LoRA-GA adapter; add the LoRA-GA "
                    "adapter first (or to a fresh model)"
                )
            if layer_kind(base) is None:
                raise LoraGAInitError(
                    f"LoRA-GA initialises Linear and Conv1D layers only, but target_modules also matched {key} "
                    f"({type(base).__name__}); it would silently keep PEFT's default init. Remove it from "
                    "target_modules (or adapt it with a separate plain LoRA adapter)"
                )
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
            self._validate(key, base, int(r))

    def _check(self, layer: LoraLayer, adapter: str, config: Any) -> None:
        try:
            if id(config) not in self._checked:
                self._checked.add(id(config))
                self._check_all_targets(config)
            # the layer itself again (a module the scan above did not see, e.g. a renamed one)
            self._validate(self._name_of(layer), layer.get_base_layer(), int(layer.r[adapter]))
        except BaseException:
            self._failed = True
            raise

    # -- writing -----------------------------------------------------------------------------------
    def _ready(self, pending: Pending) -> None:
        """PEFT finished the layer (device and dtype moves done): write A, B and the offset W0 now."""
        try:
            assert self.named_grad is not None
            name = self._name_of(pending.layer)
            A, B = factors_for(pending, self.named_grad[name], name, svd_method=self.svd_method)
            write_lora_ga_layer(pending, A, B)
            self._written.append(pending)
        except BaseException:
            self._failed = True
            raise

    def _settle_dtypes(self) -> None:
        """A and B in the settings' dtype, as get_lora_ga_model leaves them.

        PEFT's ``autocast_adapter_dtype`` up-casts bf16/fp16 adapters to float32 after the layers are
        built; the values are the stored ones (exact up-cast), only the storage dtype goes back.
        """
        for pending in self._written:
            dtype = DTYPES[pending.settings.dtype]
            for slot in (pending.layer.lora_A, pending.layer.lora_B):
                param = cast(nn.Parameter, slot[pending.adapter].weight)  # a Linear's weight
                if param.dtype != dtype:
                    with torch.no_grad(), gathered_parameters([param], modifier_rank=0):
                        param.data = param.data.to(dtype)

    def _check_nothing_left_default(self) -> None:
        """No adapter added inside the block may keep PEFT's default init (a layer kind LoRA-GA does not build)."""
        written = {(id(p.layer), p.adapter) for p in self._written}
        others = [
            f"{name} ({type(mod).__name__})"
            for name, mod in self.model.named_modules()
            if isinstance(mod, LoraLayer)
            for adapter in (*mod.lora_A, *mod.lora_embedding_A)
            if adapter not in self._adapters_before.get(id(mod), ())
            and (id(mod), adapter) not in written
        ]
        if others:
            self._failed = True
            raise LoraGAInitError(
                f"adapters created inside LoraGAContext on {', '.join(others[:5])} were not initialised with LoRA-GA "
                "(not built from a LoraGAConfig, or a layer kind LoRA-GA does not adapt); they would keep PEFT's "
                "default init"
            )

    def _restore(self) -> None:
        """Undo the writes (``W0' + s·B0·A0``, exact up to rounding) and put the original modules back."""
        for pending in reversed(self._written):
            layer, adapter = pending.layer, pending.adapter
            base = layer.get_base_layer()
            # Linear sub-modules and an adaptable base layer: all weights are Parameters
            A = cast(nn.Parameter, layer.lora_A[adapter].weight)
            B = cast(nn.Parameter, layer.lora_B[adapter].weight)
            W = cast(nn.Parameter, base.weight)
            s = float(layer.scaling[adapter])
            with torch.no_grad(), gathered_parameters([A, B, W], modifier_rank=0):
                w = dequantize_weight(base)
                requantize_weight_(base, offset_weight(w, A.data, -B.data, s))
        self._written.clear()
        current = dict(self.model.named_modules())
        for name, original in self._modules.items():
            mod = current.get(name)
            if (
                mod is None
                or mod is original
                or not isinstance(mod, LoraLayer)
                or mod.get_base_layer() is not original
            ):
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(current[parent_name] if parent_name else self.model, child, original)
        for p, flag in self._flags:
            p.requires_grad_(flag)

    # -- context protocol --------------------------------------------------------------------------
    def __enter__(self) -> LoraGAContext:
        if self.named_grad is None or len(self.named_grad) == 0:
            raise LoraGAInitError(
                "LoraGAContext needs named_grad (from loralab.lora_ga.estimate_gradient(model, dataloader, accelerator)); "
                "without gradients LoRA-GA cannot initialise, and loralab never falls back to the default init"
            )
        if not isinstance(self.named_grad, Mapping):
            raise TypeError(
                f"named_grad must be a dict of module name -> gradient, got {type(self.named_grad).__name__}"
            )
        bad = [k for k, v in self.named_grad.items() if not isinstance(v, Tensor) or v.dim() != 2]
        if bad:
            raise LoraGAInitError(f"named_grad[{bad[0]!r}] must be a 2-D (out, in) tensor")
        self._modules: dict[str, nn.Module] = {}
        self._names: dict[int, str] = {}
        for name, mod in self.model.named_modules():
            self._modules[name] = mod
            key = name.removesuffix(".base_layer")
            if key.startswith("base_model.model."):  # the model is already a PeftModel
                key = key[len("base_model.model.") :]
            self._names.setdefault(id(mod), key)
        self._adapters_before = {
            id(m): {*m.lora_A, *m.lora_embedding_A}
            for m in self._modules.values()
            if isinstance(m, LoraLayer)
        }
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        # loralab's LoRA-GA layers (built by PEFT for a LoraGAConfig) call _check while PEFT builds
        # them and _ready once each is finished: the init is written layer by layer, no PEFT hook needed
        self._session_cm = lora_ga_session(check=self._check, ready=self._ready)
        self._session = self._session_cm.__enter__()
        # the seed attaches it too (code reading it keeps working); a plain attribute, not a
        # Tensor | Module, hence setattr
        setattr(self.model, "named_grad", self.named_grad)  # noqa: B010
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self._check_nothing_left_default()
                self._settle_dtypes()
                if self._written:
                    logger.info("LoRA-GA initialised %d layers from named_grad", len(self._written))
            elif self._failed or self._written:
                self._restore()
        except BaseException:
            self._restore()
            raise
        finally:
            self._session_cm.__exit__(None, None, None)
            if "named_grad" in self.model.__dict__:
                del self.model.__dict__["named_grad"]


INIT_SUBDIR = "init_lora_checkpoint"
"""Where :func:`save_loraga_model_init` writes the initial adapter inside ``save_dir`` (the seed's name)."""


def save_loraga_model_init(model: PeftModel, save_dir: str | os.PathLike[str]) -> None:
    """Save the freshly initialised LoRA-GA adapter to ``save_dir/init_lora_checkpoint`` (the seed's helper).

    Call it right after ``get_peft_model`` and before training: :func:`save_loraga_model_final` needs
    it to turn the trained adapter into a plain LoRA adapter for the original base model. Writes on
    the main process only.

    Example:
        >>> # with LoraGAContext(model, named_grad): model = get_peft_model(model, config)
        >>> # save_loraga_model_init(model, save_dir="out")   # then train
    """
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"save_loraga_model_init expects the PeftModel returned by get_peft_model, got {type(model).__name__}"
        )
    with warnings.catch_warnings():
        # the seed's initial checkpoint is raw on purpose: save_loraga_model_final turns it into a plain LoRA
        warnings.filterwarnings("ignore", message="saving a raw LoRA-GA checkpoint")
        model.save_pretrained(
            os.path.join(os.fspath(save_dir), INIT_SUBDIR), is_main_process=is_main_process()
        )


def save_loraga_model_final(model: PeftModel, save_dir: str | os.PathLike[str]) -> None:
    """Save the trained adapter to ``save_dir`` as a plain PEFT LoRA for the *original* base model (the seed's helper).

    LoRA-GA changed the base weights (``W0 ← W0 − s·B0·A0``), so the trained adapter alone does not
    fit the original model. ``ΔW = s·(B·A − B0·A0)`` is written as a rank-2r adapter ``A' = [A; A0]``,
    ``B' = [B, −B0]`` with ``r' = 2r`` and ``α' = 2α`` (``√2·α`` with rsLoRA, so ``s`` is unchanged) by
    :func:`~loralab.lora_ga.save_lora_ga_adapter` from the initial factors kept in memory; for a model
    without them (e.g. re-loaded from the initial checkpoint) by PEFT's initial-weight conversion
    (``path_initial_model_for_weight_conversion``) from ``save_dir/init_lora_checkpoint``, with the same
    tensors. The initial checkpoint is removed afterwards, as in the seed, and the saved config is a
    plain ``LoraConfig`` (``init_lora_weights=True``, no LoRA-GA fields), so
    ``PeftModel.from_pretrained(original_base_model, save_dir)`` needs neither loralab nor the offset.

    Raises:
        FileNotFoundError: no ``save_dir/init_lora_checkpoint`` (call :func:`save_loraga_model_init` first).

    Example:
        >>> # save_loraga_model_final(model, save_dir="out")
        >>> # PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), "out")
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_loraga_model_final expects a PeftModel, got {type(model).__name__}")
    save_dir = os.fspath(save_dir)
    init_dir = os.path.join(save_dir, INIT_SUBDIR)
    if not os.path.isfile(os.path.join(init_dir, "adapter_config.json")):
        raise FileNotFoundError(
            f"{init_dir} has no initial adapter: call save_loraga_model_init(model, save_dir) right after get_peft_model, "
            "before training (the final adapter is the difference to it)"
        )
    main = is_main_process()
    in_memory = all(
        adapter in layer.__dict__.get("_lora_ga_init", {})
        for layer in model.modules()
        if isinstance(layer, LoraLayer)
        for adapter in layer.lora_A
    )
    if in_memory:
        for adapter in model.peft_config:
            save_lora_ga_adapter(
                model,
                save_dir if adapter == "default" else os.path.join(save_dir, adapter),
                adapter_name=adapter,
            )
    else:
        with warnings.catch_warnings():
            # PEFT re-reads the initial checkpoint's config as a plain LoraConfig: the LoRA-GA fields are ignored
            warnings.filterwarnings(
                "ignore", message="Unexpected keyword arguments", category=UserWarning
            )
            model.save_pretrained(
                save_dir, is_main_process=main, path_initial_model_for_weight_conversion=init_dir
            )
            if main:  # PEFT already doubled r and scaled α: keep those, drop the LoRA-GA fields
                plain_lora_config(LoraConfig.from_pretrained(save_dir)).save_pretrained(save_dir)
    if main:
        shutil.rmtree(init_dir)
