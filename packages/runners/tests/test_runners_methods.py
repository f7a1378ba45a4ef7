"""The method registry: every method sets up and trains a step; options are validated by name."""

import argparse

import pytest
import torch

from loralab.core.testing import (
    make_classification_batches,
    make_lm_batches,
    tiny_llama,
    tiny_roberta,
)
from loralab.runners.methods import (
    METHODS,
    MethodError,
    add_method_arguments,
    get_method,
    method_args,
)

RANK = 4
STEPS = 3


def installed(method: str) -> bool:
    """Whether the method's package has landed with its contract API (until then its tests stay out)."""
    try:
        get_method(method).check_available()
    except ImportError:
        return False
    return True


AVAILABLE = [m for m in METHODS if installed(m)]


def test_registry_lists_the_issue_methods():
    assert METHODS == (
        "full",
        "lora",
        "lora-ga",
        "lora-fa",
        "lora-sb",
        "lora-xs",
        "lora-pro",
        "galore",
        "golore",
    )
    for name in METHODS:
        assert get_method(name).name == name


@pytest.mark.parametrize("method", AVAILABLE)
def test_method_trains_causal_lm(method, helpers):
    torch.manual_seed(0)
    args = method_args(
        method, learning_rate=1e-2, max_steps=STEPS, progress=False, **helpers.small_options(method)
    )
    setup = get_method(method).setup(tiny_llama(), args, make_lm_batches(2))
    model, opt = setup.model, setup.optimizer
    model.train()
    batch = make_lm_batches(1, seed=1)[0]
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        setup.scheduler.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], f"{method}: loss did not decrease {losses}"


@pytest.mark.parametrize("method", [m for m in AVAILABLE if m not in ("full", "galore", "golore")])
def test_lora_methods_keep_classifier_trainable(method, helpers):
    args = method_args(
        method,
        task_type="SEQ_CLS",
        max_steps=STEPS,
        progress=False,
        **helpers.small_options(method),
    )
    setup = get_method(method).setup(tiny_roberta(), args, make_classification_batches(2))
    trainable = [n for n, p in setup.model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable), trainable
    assert not any(n.endswith("query.base_layer.weight") for n in trainable)


def test_unknown_method_names_the_argument():
    with pytest.raises(MethodError, match="--method must be one of"):
        get_method("dora")


@pytest.mark.parametrize(
    ("method", "option", "value", "applies_to"),
    [
        ("lora", "rand_ratio", 0.5, "golore"),
        ("full", "lora_r", 8, "lora"),
        ("galore", "ga_iters", 4, "lora-ga"),
    ],
)
def test_option_of_another_method_fails_fast(method, option, value, applies_to):
    with pytest.raises(
        MethodError,
        match=rf"--{option} does not apply to --method {method} \(it applies to: .*{applies_to}",
    ):
        method_args(method, **{option: value})


def test_bad_option_values_name_the_argument():
    with pytest.raises(MethodError, match="--rand_ratio must be in"):
        method_args("golore", rand_ratio=1.5)
    with pytest.raises(MethodError, match="--lora_r must be >= 1"):
        method_args("lora", lora_r=0)
    with pytest.raises(MethodError, match="unknown method argument"):
        method_args("lora", lora_rank=4)
    with pytest.raises(MethodError, match="max_steps"):
        method_args("lora", max_steps=0)


def test_command_line_flags_and_defaults():
    parser = add_method_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--method",
            "golore",
            "--galore_rank",
            "16",
            "--rand_ratio",
            "0.8",
            "--target_modules",
            "q_proj,v_proj",
        ]
    )
    for k, v in dict(max_steps=10, learning_rate=1e-3).items():
        setattr(args, k, v)
    from loralab.runners.methods import resolve_method_options

    resolve_method_options(get_method("golore"), args)
    assert (args.galore_rank, args.rand_ratio, args.update_proj_gap) == (16, 0.8, 200)
    assert args.target_modules == ["q_proj", "v_proj"]
    bad = parser.parse_args(["--method", "lora", "--update_proj_gap", "5"])
    with pytest.raises(MethodError, match="--update_proj_gap does not apply to --method lora"):
        resolve_method_options(get_method("lora"), bad)
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "lora-ga", "--ga_direction", "sideways"])


def test_setup_method_refuses_an_option_of_another_method_in_arguments_built_by_hand():
    # Method.setup checks the method's own options only; the entrypoints' setup_method adds the
    # registry's check, so arguments that skipped method_args / parse_args are still refused
    from loralab.runners.methods import setup_method

    args = method_args("lora", lora_r=RANK)
    args.rand_ratio = 0.5
    with pytest.raises(
        MethodError,
        match=r"^--rand_ratio does not apply to --method lora \(it applies to: golore\); remove it$",
    ):
        setup_method(get_method("lora"), tiny_llama(), args)
    own = get_method("lora").resolve_options(argparse.Namespace(max_steps=10, rand_ratio=0.5))
    assert (own.lora_r, own.rand_ratio, own.optim) == (8, 0.5, "adamw")


def test_base_imports_no_method_module():
    """The method modules and the registry import base: base importing any of them (even lazily,
    inside a function) would close an import circle."""
    import ast
    import inspect

    from loralab.runners.methods import base

    for node in ast.walk(ast.parse(inspect.getsource(base))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [getattr(node, "module", None) or "", *(a.name for a in node.names)]
            assert not any(n.startswith("loralab.runners.methods") for n in names), ast.unparse(
                node
            )


def test_gradient_methods_need_batches():
    if not installed("lora-sb"):
        pytest.skip("loralab-lora-sb not installed")
    with pytest.raises(MethodError, match="train_batches are required"):
        get_method("lora-sb").setup(tiny_llama(), method_args("lora-sb", lora_r=RANK))


def test_missing_package_gives_pip_hint(monkeypatch):
    method = get_method("lora-pro")
    monkeypatch.setattr(type(method), "module", "loralab.not_a_package_xyz")
    with pytest.raises(ImportError, match=r"pip install loralab-lora-pro"):
        method.check_available()


def test_options_come_from_the_method_modules_and_their_config_dataclasses():
    from typing import get_args, get_type_hints

    from loralab.runners.methods import OPTIONS

    # the union of every method's own options, each method's defaults naming exactly its options
    declared = {o.name for m in METHODS for o in get_method(m).options}
    assert set(OPTIONS) == declared
    for m in METHODS:
        assert {o.name for o in get_method(m).options} == set(get_method(m).defaults)
    sourced = [o for o in OPTIONS.values() if o.source is not None]
    assert {o.name for o in sourced} >= {
        "lora_r",
        "lora_alpha",
        "ga_iters",
        "ga_scale",
        "sb_update_approximation",
    }
    for opt in sourced:
        cls, f = opt.source_field()
        # the flag's help is the field's metadata["help"]; its choices are the field's Literal values
        assert " ".join(f.metadata["help"].split()) in opt.describe()
        literal = get_args(get_type_hints(cls)[f.name])
        if opt.choices is not None:
            assert tuple(opt.choices) == literal, opt.name
    bad = type(next(iter(sourced)))("x", int, source="peft:LoraConfig.nope")
    with pytest.raises(ValueError, match="LoraConfig has no field 'nope'"):
        bad.source_field()
