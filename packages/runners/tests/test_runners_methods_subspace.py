"""Registry pieces the C4 runner builds on: the optim choice (AdamW / momentum SGD), the rank-vs-width
check on a meta-device model, GaLore's seed, and the golore-relora method with its per-step hooks."""

import pytest
import torch

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.runners.methods import METHODS, MethodError, get_method, method_args

RANK, GAP, STEPS = 4, 2, 4


def _meta_llama() -> torch.nn.Module:
    with torch.device("meta"):
        return tiny_llama()


@pytest.mark.parametrize("method", ["galore", "golore", "golore-relora"])
def test_rank_above_the_narrowest_layer_is_refused_on_a_meta_model(method):
    """The tiny LLaMA's k_proj is 32 x 64: rank 33 would be clipped silently by the optimizers."""
    extra = {"rand_ratio": 0.5} if method != "galore" else {}
    args = method_args(method, galore_rank=33, **extra)
    with pytest.raises(
        MethodError,
        match=r"--galore_rank 33 is larger than layer model\.layers\.0\.self_attn\.k_proj \(32 x 64; "
        r"its projected side is 32 wide\) can take: the largest valid rank for this model is 32",
    ):
        get_method(method).check_model(_meta_llama(), args)
    get_method(method).check_model(_meta_llama(), method_args(method, galore_rank=32, **extra))


def test_rank_check_follows_proj_type_and_the_entrypoints_flag_name():
    # reverse_std projects the larger side: k_proj's 64 and the MLP's 128; the square q_proj allows 64
    args = method_args("galore", galore_rank=100, proj_type="reverse_std")
    args.flag_names = {"galore_rank": "rank"}
    with pytest.raises(MethodError, match=r"^--rank 100 .*with proj_type reverse_std is 64 wide"):
        get_method("galore").check_model(_meta_llama(), args)
    args = method_args(
        "galore", galore_rank=100, proj_type="left", target_modules="up_proj,gate_proj"
    )
    get_method("galore").check_model(_meta_llama(), args)  # (128, 64) left side: 128 wide


def test_setup_refuses_the_rank_before_building_the_optimizer():
    with pytest.raises(MethodError, match="the largest valid rank for this model is 32"):
        get_method("golore").setup(tiny_llama(), method_args("golore", galore_rank=128))


def test_optim_sgd_builds_momentum_sgd_and_is_refused_where_it_does_not_apply():
    from loralab.golore import GaLoreSGD

    args = method_args("galore", galore_rank=RANK, optim="sgd", momentum=0.5, learning_rate=0.1)
    opt = get_method("galore").setup(tiny_llama(), args).optimizer
    assert isinstance(opt, GaLoreSGD) and all(g["momentum"] == 0.5 for g in opt.param_groups)
    full = get_method("full").setup(tiny_llama(), method_args("full", optim="sgd")).optimizer
    assert isinstance(full, torch.optim.SGD) and full.defaults["momentum"] == 0.9
    with pytest.raises(
        MethodError, match=r"--optim sgd does not apply to --method lora \(it runs with: adamw\)"
    ):
        method_args("lora", optim="sgd")


def test_subspace_optimizer_takes_the_run_seed():
    opt = get_method("golore").setup(tiny_llama(), method_args("golore", galore_rank=RANK, seed=7))
    assert {g["seed"] for g in opt.optimizer.param_groups if g.get("rank")} == {7}


def _relora_run(hooks: bool, optim: str = "adamw"):
    torch.manual_seed(0)
    args = method_args(
        "golore-relora",
        galore_rank=RANK,
        update_proj_gap=GAP,
        rand_ratio=0.5,
        max_steps=STEPS,
        learning_rate=1e-2,
        optim=optim,
    )
    setup = get_method("golore-relora").setup(tiny_llama(), args)
    (cb,) = setup.callbacks
    losses = []
    for step, batch in enumerate(make_lm_batches(1, seed=1) * STEPS):
        if hooks:
            cb.on_step_begin(step, setup.model)
        loss = setup.model(**batch).loss
        loss.backward()
        if hooks:
            cb.before_optimizer_step(step, setup.model, setup.optimizer)
        setup.optimizer.step()
        setup.optimizer.zero_grad()
        cb.on_step_end(step + 1, setup.model, setup.optimizer)
        losses.append(loss.item())
    return setup, cb, losses


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_golore_relora_equals_the_seed_loop(optim):
    """The method's hooks do what the GoLore seed loop does by hand (same losses, bit for bit)."""
    from loralab.golore import ReLoRaModel

    setup, cb, losses = _relora_run(hooks=True, optim=optim)
    assert cb.n_resets == STEPS // GAP and losses[-1] < losses[0]
    torch.manual_seed(0)
    model = ReLoRaModel(
        tiny_llama(),
        target_modules=["attn", "mlp"],
        r=RANK,
        lora_dropout=0.0,
        scale=0.25,
        seed=42,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        if optim == "adamw"
        else torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    )
    ref = []
    for step, batch in enumerate(make_lm_batches(1, seed=1) * STEPS):
        model._config.forward_type = step % GAP == 0
        loss = model(**batch).loss
        loss.backward()
        if step % GAP == 0:
            model.merge_and_reinit(opt, step / STEPS >= 0.5)
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())
    assert losses == ref
    state = get_method("golore-relora").checkpoint_state(setup.model)
    assert torch.equal(state["relora_generator"], model.generator.get_state())


def test_golore_relora_refuses_a_loop_without_its_hooks():
    with pytest.raises(RuntimeError, match="needs a training loop that calls on_step_begin"):
        _relora_run(hooks=False)


def test_golore_relora_is_not_a_fine_tuning_choice_yet():
    assert "golore-relora" not in METHODS
    m = get_method("golore-relora")
    assert not m.ddp_wrappable and not m.zero_partitioning and m.optimizers == ("adamw", "sgd")
    with pytest.raises(MethodError, match="--proj_type does not apply to --method golore-relora"):
        method_args("golore-relora", proj_type="left")
