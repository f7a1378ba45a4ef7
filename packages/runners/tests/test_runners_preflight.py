"""Bad input is refused before any model or data loads, naming the flag, the file and line, and the fix.

Each test drives a real entrypoint (``glue.main``, ``metamath.main``, ``winogrande.main``, ``loralab
compare``) with one bad input; the checks themselves are also called directly for the cases that need
no entrypoint.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest

from loralab.runners import glue, metamath, preflight, winogrande
from loralab.runners.cli import main as loralab_main
from loralab.runners.compare.checks import check_overrides
from loralab.runners.data import load_split
from loralab.runners.preflight import (
    PreflightError,
    check_data_file,
    check_device,
    check_model_path,
    check_output_dir_writable,
)

TINY_WIDTH = 64
"""Hidden size of the tiny test models: every attention projection of RoBERTa is 64 x 64."""


def glue_argv(model: str, files: dict, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model, "--task_name", "sst2",
        "--train_file", files["train"], "--validation_file", files["validation"],
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_length", "32",
        "--max_steps", "1", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if an entrypoint gets as far as loading a model (the check must come first)."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(glue, "load_seq_cls_model", boom)
    monkeypatch.setattr(metamath, "load_causal_lm", boom)


# ---------------------------------------------------------------- --set (loralab compare)


def _compare_set(out, item):
    return loralab_main(["compare", "--model", "tiny", "--output_dir", str(out), "--set", item])


def test_compare_unknown_set_key_names_it_and_suggests(tmp_path, capsys):
    assert _compare_set(tmp_path, "lora.learning_rat=1e-3") == 2
    err = capsys.readouterr().err
    assert "--set lora.learning_rat=1e-3: unknown key 'learning_rat'" in err
    assert "did you mean 'learning_rate'?" in err
    assert not (tmp_path / "runs").exists()  # refused before any method process


def test_compare_wrong_type_names_key_value_and_type(tmp_path, capsys):
    assert _compare_set(tmp_path, "lora.learning_rate=abc") == 2
    err = capsys.readouterr().err
    assert "--set lora.learning_rate=abc: learning_rate must be a float" in err and "'abc'" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "item, message",
    [
        ("lora_r=4.5", "lora_r must be an int (a whole number like 8), got '4.5'"),
        ("use_rslora=maybe", "use_rslora must be a bool (true or false), got 'maybe'"),
        ("max_steps=10", "max_steps is set by loralab compare for every method; use --steps"),
        ("seed=1", "use --seed"),
        ("lora.lora_rank=4", "did you mean 'lora_r'?"),
    ],
)
def test_set_checks(item, message):
    with pytest.raises(PreflightError) as info:
        check_overrides([item], ["lora", "full"])
    assert str(info.value).startswith(f"--set {item}: ") and message in str(info.value)


def test_set_accepts_what_the_recipes_take():
    check_overrides(
        ["learning_rate=1e-3", "lora.lora_r=4", "lora.use_rslora=true", "golore.rand_ratio=0",
         "lora.target_modules=query,value", "lora-pro.pro_x_mode=zero", "lora.lora_dropout=none"],
        ["lora", "lora-pro", "golore"],
    )  # fmt: skip


# ---------------------------------------------------------------- --device


def test_compare_cuda_device_without_cuda_is_refused(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = loralab_main(
        ["compare", "--model", "tiny", "--output_dir", str(tmp_path), "--device", "cuda"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--device cuda: this machine has no CUDA device" in err and "use --device cpu" in err
    assert not (tmp_path / "runs").exists()


def test_device_index_and_name(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda:0")
    with pytest.raises(PreflightError, match=r"--device cuda:2: there are 1 CUDA device\(s\) here"):
        check_device("cuda:2")
    with pytest.raises(PreflightError, match="--device gpu0: not a device name"):
        check_device("gpu0")
    check_device("auto")
    check_device("cpu")


# ---------------------------------------------------------------- model path


def test_missing_local_model_path_is_not_taken_for_a_hub_id(glue_files, tmp_path, no_model_load):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(
        FileNotFoundError, match=r"--model_name_or_path .*no-such-model: no such directory"
    ):
        glue.main(glue_argv(missing, glue_files, tmp_path / "out"))
    with pytest.raises(
        FileNotFoundError, match=r"--model_name_or_path \./no/such: no such directory"
    ):
        check_model_path("./no/such")
    check_model_path("FacebookAI/roberta-base")  # a hub id: left to from_pretrained
    check_model_path("gpt2")


def test_model_path_that_holds_no_model(glue_files, tmp_path, no_model_load):
    with pytest.raises(PreflightError, match=r"the directory has no config\.json"):
        glue.main(glue_argv(str(tmp_path), glue_files, tmp_path / "out"))
    with pytest.raises(PreflightError, match="is a file; give the model's directory"):
        check_model_path(glue_files["train"])


def test_compare_missing_model_path(tmp_path, capsys):
    code = loralab_main(
        ["compare", "--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]
    )
    assert code == 2
    assert "--model " in capsys.readouterr().err


# ---------------------------------------------------------------- data files


def test_empty_train_file_names_the_file(tiny_dirs, glue_files, tmp_path, no_model_load):
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    files = {**glue_files, "train": str(empty)}
    with pytest.raises(
        PreflightError, match=r"--train_file .*train\.jsonl: the file is empty \(0 bytes\)"
    ):
        glue.main(glue_argv(tiny_dirs["roberta"], files, tmp_path / "out"))


def test_corrupted_jsonl_line_names_file_and_line(tiny_dirs, glue_files, tmp_path, no_model_load):
    bad = tmp_path / "train.jsonl"
    good = json.dumps({"sentence": "good", "label": 1})
    bad.write_text(f'{good}\n{good}\n{{"sentence": "cut off\n{good}\n')
    files = {**glue_files, "train": str(bad)}
    with pytest.raises(
        PreflightError,
        match=r"--train_file .*train\.jsonl, line 3: not valid JSON .*fix or delete the line",
    ):
        glue.main(glue_argv(tiny_dirs["roberta"], files, tmp_path / "out"))


def test_non_utf8_bytes_name_file_and_line(tiny_dirs, metamath_files, tmp_path, no_model_load):
    bad = tmp_path / "metamath.jsonl"
    bad.write_bytes(b'{"query": "1+1?", "response": "2"}\n{"query": "caf\xe9", "response": "x"}\n')
    argv = ["--model_name_or_path", tiny_dirs["llama"], "--train_file", str(bad),
            "--eval_file", metamath_files["eval"], "--output_dir", str(tmp_path / "out"),
            "--method", "lora", "--lora_r", "2", "--max_steps", "1"]  # fmt: skip
    with pytest.raises(
        PreflightError,
        match=r"--train_file .*metamath\.jsonl, line 2: byte 0xe9 at column 15 is not UTF-8; save the file as UTF-8",
    ):
        metamath.main(argv)


def test_winogrande_bad_validation_file(tiny_dirs, winogrande_files, tmp_path):
    bad = tmp_path / "dev.csv"
    bad.write_text("sentence,option1,option2,answer\n")
    argv = ["--model_name_or_path", tiny_dirs["llama"], "--train_file", winogrande_files["train"],
            "--validation_file", str(bad), "--output_dir", str(tmp_path / "out"),
            "--method", "lora", "--lora_r", "2", "--max_steps", "1"]  # fmt: skip
    with pytest.raises(
        PreflightError, match=r"--validation_file .*dev\.csv: has a header .* but no example rows"
    ):
        winogrande.main(argv)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.json", b'[{"a": 1},\n {"a": 2,}]', r"a\.json, line 2: not valid JSON"),
        ("a.json", b"[]", "the file has no example"),
        ("a.jsonl", b"\n\n", "the file has no example"),
        ("a.jsonl", b'{"a": 1}\n[1, 2]\n', r"line 2: a JSON list where one JSON object per line"),
        ("a.csv", b"a,b\n1,2\n1,2,3\n", r"line 3: 3 fields but the header has 2"),
        (
            "a.tsv",
            b"a\tb\n1\t2\t3\n",
            r"line 2: 3 fields but the header has 2 \(a, b\); quote fields that contain a tab",
        ),
        ("a.parquet", b"not parquet", "not a readable parquet file"),
        ("a.txt", b"x", r"unsupported extension '\.txt'"),
    ],
)
def test_data_file_problems(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PreflightError, match=rf"--train_file .*{message}"):
        check_data_file(str(path), "--train_file")


def test_valid_data_files_pass(tmp_path, glue_files, metamath_files, winogrande_files):
    import pandas as pd

    for path in (*glue_files.values(), *metamath_files.values(), *winogrande_files.values()):
        check_data_file(path, "--train_file")
    (tmp_path / "lines.json").write_text('{"a": 1}\n{"a": 2}\n')
    (tmp_path / "one.json").write_text('{\n "a": 1\n}\n')
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfa,b\n1,2\n1\n")
    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "ok.parquet")
    for name in ("lines.json", "one.json", "bom.csv", "ok.parquet"):
        check_data_file(str(tmp_path / name), "--train_file")


def test_load_split_names_the_line_too(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(PreflightError, match=r"--train_file .*t\.jsonl, line 2"):
        load_split(None, None, "train", str(bad), arg="--train_file")


# ---------------------------------------------------------------- --output_dir


def test_output_dir_that_is_a_file(tiny_dirs, glue_files, tmp_path, no_model_load):
    target = tmp_path / "results"
    target.write_text("not a directory")
    with pytest.raises(
        PreflightError, match=r"--output_dir .*results: is an existing file, not a directory"
    ):
        glue.main(glue_argv(tiny_dirs["roberta"], glue_files, target))
    with pytest.raises(PreflightError, match=r"cannot be created because .*results is a file"):
        check_output_dir_writable(str(target / "sub"))


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="/proc takes no new files on Linux"
)
def test_unwritable_output_dir(tmp_path, capsys):
    # /proc refuses new files even to root (a chmod'ed directory does not: tests may run as root)
    with pytest.raises(
        PreflightError, match=r"--output_dir /proc/loralab-out: cannot write in /proc"
    ):
        check_output_dir_writable("/proc/loralab-out")
    assert loralab_main(["compare", "--model", "tiny", "--output_dir", "/proc/loralab-out"]) == 2
    assert "choose a directory you can write to" in capsys.readouterr().err


# ---------------------------------------------------------------- ranks


@pytest.mark.parametrize(
    "method, flags, largest",
    [
        ("lora", ["--lora_r", "128"], 64),
        ("lora-pro", ["--lora_r", "128"], 64),
        ("lora-fa", ["--lora_r", "128"], 64),
        ("lora-ga", ["--lora_r", "40", "--ga_iters", "1"], 32),
        ("golore", ["--galore_rank", "128"], 64),
        ("galore", ["--galore_rank", "65"], 64),
    ],
)
def test_rank_larger_than_a_target_layer(
    method, flags, largest, tiny_dirs, glue_files, tmp_path, no_model_load
):
    option = flags[0]
    with pytest.raises(
        PreflightError,
        match=rf"{option} \d+: too large for target layer roberta\.encoder\.layer\.0\.attention\.self\.query "
        rf"\(64 x 64\).*the largest valid {option[2:]} for these target layers is {largest}",
    ):
        glue.main(
            glue_argv(
                tiny_dirs["roberta"], glue_files, tmp_path / "out", "--method", method, *flags
            )
        )


def test_rank_equal_to_the_width_is_valid(tiny_dirs):
    from loralab.runners.methods import method_args

    for method, kw in (("lora", {"lora_r": TINY_WIDTH}), ("golore", {"galore_rank": TINY_WIDTH}),
                       ("lora-ga", {"lora_r": TINY_WIDTH // 2})):  # fmt: skip
        preflight.check_ranks(
            tiny_dirs["roberta"],
            [preflight.rank_request(method, method_args(method, **kw))],
            auto_class="AutoModelForSequenceClassification",
        )


def test_rank_check_on_causal_lm_names_the_narrow_layer(
    tiny_dirs, metamath_files, tmp_path, no_model_load
):
    # tiny LLaMA: 2 KV heads of 16, so k_proj / v_proj are 32 x 64
    argv = ["--model_name_or_path", tiny_dirs["llama"], "--train_file", metamath_files["train"],
            "--eval_file", metamath_files["eval"], "--output_dir", str(tmp_path / "out"),
            "--method", "lora", "--lora_r", "48", "--max_steps", "1"]  # fmt: skip
    with pytest.raises(
        PreflightError,
        match=r"k_proj \(32 x 64\).*largest valid lora_r for these target layers is 32",
    ):
        metamath.main(argv)
    # the same rank on wide layers only is fine
    from loralab.runners.methods import method_args

    preflight.check_ranks(
        tiny_dirs["llama"],
        [
            preflight.rank_request(
                "lora", method_args("lora", lora_r=48, target_modules="q_proj,o_proj")
            )
        ],
        auto_class="AutoModelForCausalLM",
    )


def test_compare_rank_too_large_is_refused_before_any_process(tmp_path, capsys):
    code = loralab_main(
        ["compare", "--model", "tiny", "--methods", "lora", "golore", "--output_dir", str(tmp_path),
         "--set", "lora.lora_r=128"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "lora_r=128 for lora (--set lora.lora_r=128): too large for target layer" in err
    assert "the largest valid lora_r for these target layers is 64" in err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- valid input passes


def test_existing_fixtures_pass(tiny_dirs, glue_files, tmp_path):
    from loralab.runners.arguments import parse_args

    args = parse_args(
        glue.GlueArgs,
        glue_argv(tiny_dirs["roberta"], glue_files, tmp_path / "out", "--lora_r", "4"),
    )
    preflight.check_train_args(args, auto_class="AutoModelForSequenceClassification")


def test_json_file_with_a_non_utf8_first_line_names_it(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(
        PreflightError, match=r"--train_file .*a\.json, line 1: byte 0xff at column 8"
    ):
        check_data_file(str(path), "--train_file")


def test_large_json_array_is_checked_for_utf8_only(tmp_path, monkeypatch):
    # above WHOLE_JSON_LIMIT the file is streamed (UTF-8 per line), not held in memory to parse
    monkeypatch.setattr(preflight, "WHOLE_JSON_LIMIT", 10)
    path = tmp_path / "big.json"
    path.write_text('[{"a": 1},\n {"a": 2}]\n')
    check_data_file(str(path), "--train_file")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"a": 1},\n {"a": "\xe9"}]\n')
    with pytest.raises(PreflightError, match=r"bad\.json, line 2: byte 0xe9"):
        check_data_file(str(bad), "--train_file")


def test_classification_heads_are_not_rank_checked(tiny_dirs):
    # T5's classification_head.out_proj is 2 x 64: trained in full (modules_to_save), never adapted
    from loralab.runners.glue import HEAD_NAMES
    from loralab.runners.methods import method_args

    request = [preflight.rank_request("lora", method_args("lora", lora_r=4))]
    preflight.check_ranks(
        tiny_dirs["t5"], request, auto_class="AutoModelForSequenceClassification", heads=HEAD_NAMES
    )
    # without the entrypoint's head names the head is a target like any other layer
    with pytest.raises(PreflightError, match=r"classification_head\.out_proj \(2 x 64\)"):
        preflight.check_ranks(
            tiny_dirs["t5"], request, auto_class="AutoModelForSequenceClassification"
        )


# ---------------------------------------------------------------- exit status, no traceback


@pytest.mark.parametrize(
    "extra, message",
    [
        ((), r"--model_name_or_path .*no-such-model: no such directory"),  # a preflight check
        (("--learning_rate", "-1"), r"--learning_rate must be > 0, got -1\.0"),  # a config check
        (("--method", "galore", "--lora_r", "3"), r"--lora_r does not apply to --method galore"),
    ],
)
def test_bad_input_exits_2_with_the_message_and_no_traceback(
    extra, message, glue_files, tmp_path, capsys, no_model_load
):
    import re

    from loralab.runners.cli import run_entrypoint

    argv = glue_argv(str(tmp_path / "no-such-model"), glue_files, tmp_path / "out", *extra)
    assert run_entrypoint(glue.main, argv, prog="python -m loralab.runners.glue") == 2
    err = capsys.readouterr().err
    assert re.search(r"^python -m loralab\.runners\.glue: error: " + message, err, re.M), err
    assert "Traceback" not in err
    assert loralab_main(["glue", *argv]) == 2
    assert "loralab glue: error: " in capsys.readouterr().err


def test_c4_bad_input_exits_2(tmp_path, capsys):
    from loralab.runners.c4.cli import main as c4_main
    from loralab.runners.cli import run_entrypoint

    argv = ["--optimizer", "adamw", "--rank", "7", "--output_dir", str(tmp_path / "c4")]
    assert run_entrypoint(c4_main, argv, prog="c4_pretrain.py") == 2
    err = capsys.readouterr().err
    assert "c4_pretrain.py: error: options that this run would ignore: --rank" in err, err


@pytest.mark.parametrize(
    "item, message",
    [
        ("full.lora_r=4", r"lora_r is not an option of full \(it applies to: lora, lora-ga"),
        ("lora.rand_ratio=0.5", r"rand_ratio is not an option of lora \(it applies to: golore"),
        ("galore_rank=4", r"galore_rank is not an option of any of --methods full, lora"),
        ("lora-fa.lora_r=4", r"lora-fa is not among --methods \(full, lora\)"),
    ],
)
def test_set_item_that_reaches_no_compared_method_is_refused(item, message):
    with pytest.raises(PreflightError, match=rf"--set {re.escape(item)}: {message}"):
        check_overrides([item], ["full", "lora"])
    check_overrides(["lora_r=4", "lora.lora_r=8", "learning_rate=1e-3"], ["full", "lora"])


def test_accelerate_deepspeed_plugin_nvme_offload_is_refused_before_loading(
    tiny_dirs, glue_files, tmp_path, monkeypatch
):
    # accelerate launch --config_file deepspeed_zero3_offload.yaml: the plugin's JSON is read up front
    from loralab.runners.arguments import parse_args
    from loralab.runners.launch import DEEPSPEED_CONFIGS
    from loralab.runners.methods import MethodError

    path = tmp_path / "z3o.json"
    config = copy.deepcopy(DEEPSPEED_CONFIGS["zero3_offload"])
    config["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": str(tmp_path)}
    path.write_text(json.dumps(config))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    args = parse_args(
        glue.GlueArgs,
        glue_argv(tiny_dirs["roberta"], glue_files, tmp_path / "out", "--method", "lora-fa"),
    )
    with pytest.raises(
        MethodError,
        match=r"--method lora-fa does not run with DeepSpeed ZeRO offload to NVMe \(accelerate's "
        r"DeepSpeed plugin \(.*z3o.json\): zero_optimization.offload_param on nvme\)",
    ):
        preflight.check_train_args(args, auto_class="AutoModelForSequenceClassification")


def test_rank_check_builds_its_meta_model_without_a_registered_zero3_config(tiny_dirs):
    # a ZeRO-3 DeepSpeed config registered with transformers (an earlier run in the process) would make
    # from_config build under deepspeed.zero.Init, a collective; the shapes-only model needs none of it
    # (a second training in one ZeRO-3 launch hung here), and the registration is left as it was
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    registered = HfDeepSpeedConfig(
        {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    )
    try:
        assert is_deepspeed_zero3_enabled()
        model = preflight._meta_model(tiny_dirs["llama"], "AutoModelForCausalLM")
        assert all(p.is_meta and not hasattr(p, "ds_id") for p in model.parameters())
        assert is_deepspeed_zero3_enabled()
    finally:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    del registered
