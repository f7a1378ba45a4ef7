"""C4 data path, pre-tokenized shards, schedules, arguments and model presets (no training loop here,
except one pair of short runs that checks token shards feed the trainer exactly what raw text does)."""

from __future__ import annotations

import gzip
import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from loralab.core.testing import offline_tokenizer
from loralab.runners.c4 import (
    MODEL_CONFIGS,
    load_model_config,
    lr_multiplier,
    main,
    parse_args,
    run,
)
from loralab.runners.c4.data import (
    DataExhaustedError,
    ListSource,
    LocalSource,
    SequenceStream,
    TokenizedSource,
    collate,
    find_shards,
)
from loralab.runners.c4.schedule import get_scheduler
from loralab.runners.c4.testing import synthetic_documents, write_c4_shards, write_tiny_setup

MAX_LEN = 16
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "llama_c4"


@pytest.fixture(scope="module")
def tok():
    return offline_tokenizer()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_c4_shards(
        tmp_path_factory.mktemp("c4") / "en", train_docs=60, validation_docs=10, train_files=3
    )


def _docs(path: Path) -> list[str]:
    with gzip.open(path, "rt") as fh:
        return [json.loads(ln)["text"] for ln in fh if ln.strip()]


def _reference_pack(docs: list[str], tok, max_length: int) -> list[list[int]]:
    """Packing written out: every document's tokens followed by EOS, cut into full windows."""
    flat: list[int] = []
    for d in docs:
        flat += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return [flat[i : i + max_length] for i in range(0, len(flat) - max_length + 1, max_length)]


# --- raw text --------------------------------------------------------------------------------------
def test_pack_joins_documents_with_eos_and_cuts_full_windows(tok):
    docs = synthetic_documents(12, seed=3, min_words=2, max_words=9)
    want = _reference_pack(docs, tok, MAX_LEN)
    stream = SequenceStream(ListSource(docs), tok, MAX_LEN, chunk_docs=5)
    got = stream.next_sequences(len(want))
    assert got == want
    with pytest.raises(DataExhaustedError, match="ran out after 12 documents"):
        stream.next_sequences(1)


def test_truncate_gives_one_padded_document_per_sequence(tok):
    docs = ["a b c", "x" * 40]
    seqs = SequenceStream(ListSource(docs), tok, MAX_LEN, packing="truncate").next_sequences(2)
    assert seqs == [tok(d, max_length=MAX_LEN, truncation=True)["input_ids"] for d in docs]
    batch = collate(seqs, MAX_LEN, pad_id=0)
    n0 = len(seqs[0])
    assert batch["attention_mask"][0].sum() == n0 and batch["attention_mask"][1].sum() == MAX_LEN
    assert (batch["labels"][0, n0:] == -100).all() and (
        batch["labels"][0, :n0] == batch["input_ids"][0, :n0]
    ).all()


def test_local_streams_are_disjoint_and_cover_the_shards(shards, tok):
    files = find_shards(shards, "train")
    assert [p.name for p in files] == [f"c4-train.{k:05d}-of-00003.json.gz" for k in range(3)]
    assert [p.name for p in find_shards(shards, "validation")] == [
        "c4-validation.00000-of-00001.json.gz"
    ]
    src = LocalSource(files, shuffle_seed=None)
    all_docs = [d for f in files for d in _docs(f)]
    parts = [list(src.iter_stream(s, 3)) for s in range(3)]
    assert [d for p in parts for d in p] != all_docs  # interleaved, not blocks
    assert sorted(d for p in parts for d in p) == sorted(all_docs)
    assert parts[1] == all_docs[1::3]
    assert list(src.iter_stream(1, 3, skip=4)) == all_docs[1::3][4:]
    # a shuffle seed permutes the files, not the lines inside them
    shuffled = LocalSource(files, shuffle_seed=42)
    assert sorted(p.name for p in shuffled.files) == sorted(p.name for p in files)


def test_stream_state_resumes_at_the_next_sequence(shards, tok, tmp_path):
    src = LocalSource(find_shards(shards, "train"))
    full = SequenceStream(src, tok, MAX_LEN, stream=1, num_streams=2, chunk_docs=3)
    want = full.next_sequences(40)
    first = SequenceStream(src, tok, MAX_LEN, stream=1, num_streams=2, chunk_docs=3)
    assert first.next_sequences(17) == want[:17]
    torch.save(first.state_dict(), tmp_path / "state.pt")
    again = SequenceStream(src, tok, MAX_LEN, stream=1, num_streams=2, chunk_docs=3)
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert again.next_sequences(23) == want[17:]
    other = SequenceStream(src, tok, MAX_LEN, stream=1, num_streams=4)
    with pytest.raises(ValueError, match="num_streams=2 but this run has num_streams=4"):
        other.load_state_dict(first.state_dict())


def test_shard_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no json/jsonl.*shards for split 'train'"):
        find_shards(tmp_path, "train")
    bad = tmp_path / "c4-train.00000-of-00001.json"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(
        KeyError, match=r"c4-train.00000-of-00001.json:1: record has no 'text' field.*--text_field"
    ):
        list(LocalSource([bad]).iter_stream(0, 1))
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r":1: not a JSON object per line"):
        list(LocalSource([bad]).iter_stream(0, 1))
    with pytest.raises(ValueError, match="stream must be in"):
        SequenceStream(ListSource([]), offline_tokenizer(), MAX_LEN, stream=2, num_streams=2)


# --- pre-tokenized shards ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenized(shards, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    tok_dir = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(tok_dir)
    main(["pretokenize", "--output_dir", str(out), "--tokenizer", str(tok_dir), "--max_length", str(MAX_LEN),
          "--train_data", str(shards), "--sequences_per_shard", "50"])  # fmt: skip
    return out


def test_pretokenize_writes_the_packed_sequences_and_the_loader_reads_them(tokenized, shards, tok):
    meta = json.loads((tokenized / "tokens_meta.json").read_text())
    assert meta["max_length"] == MAX_LEN and meta["vocab_size"] == 260 and meta["dtype"] == "uint16"
    # the same packed sequences the trainer would make from the raw text, in the same (seeded) file order
    want_train = SequenceStream(
        LocalSource(find_shards(shards, "train"), shuffle_seed=42), tok, MAX_LEN
    )
    n_train = meta["splits"]["train"]["num_sequences"]
    assert meta["splits"]["train"]["files"] == [
        f"train-{k:05d}.npy" for k in range(math.ceil(n_train / 50))
    ]
    assert meta["splits"]["train"]["documents"] == 60
    src = TokenizedSource(tokenized, "train")
    assert len(src) == n_train
    assert [src.sequence(j) for j in range(n_train)] == want_train.next_sequences(n_train)
    assert np.load(tokenized / "train-00000.npy").shape == (50, MAX_LEN)
    val = TokenizedSource(tokenized, "validation")
    want_val = SequenceStream(
        LocalSource(find_shards(shards, "validation"), shuffle_seed=None), tok, MAX_LEN
    )
    assert [val.sequence(j) for j in range(len(val))] == want_val.next_sequences(len(val))

    # streams: sequence j -> stream j mod S, with a resumable position
    s1 = src.stream(1, 3)
    assert s1.next_sequences(4) == [src.sequence(j) for j in (1, 4, 7, 10)]
    state = torch.load(io.BytesIO(_saved(s1.state_dict())), weights_only=True)
    s1b = src.stream(1, 3)
    s1b.load_state_dict(state)
    assert s1b.next_sequences(2) == [src.sequence(13), src.sequence(16)]
    with pytest.raises(ValueError, match="another --data_streams"):
        src.stream(0, 2).load_state_dict(state)
    with pytest.raises(DataExhaustedError, match="token shards ran out"):
        src.stream(0, 1).next_sequences(n_train + 1)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_tokenized_dir_errors(tokenized, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokens_meta.json.*pretokenize"):
        TokenizedSource(tmp_path)
    with pytest.raises(KeyError, match="has no 'test' split"):
        TokenizedSource(tokenized, "test")


def test_training_on_token_shards_equals_training_on_the_raw_text(tmp_path):
    setup = write_tiny_setup(tmp_path / "setup", train_docs=60, validation_docs=8)
    tokens = tmp_path / "tokens"
    main(["pretokenize", "--output_dir", str(tokens), "--tokenizer", setup["tokenizer"], "--max_length", "32",
          "--train_data", setup["train_data"]])  # fmt: skip
    common = ["--model_config", setup["model_config"], "--tokenizer", setup["tokenizer"], "--max_length", "32",
              "--batch_size", "4", "--num_training_steps", "4", "--warmup_steps", "1", "--lr", "3e-3",
              "--eval_every", "4", "--save_every", "4", "--eval_tokens", "256", "--plot", "false"]  # fmt: skip
    raw = run(
        parse_args(
            ["--output_dir", str(tmp_path / "raw"), "--train_data", setup["train_data"], *common]
        )
    )
    pre = run(
        parse_args(["--output_dir", str(tmp_path / "pre"), "--tokenized_dir", str(tokens), *common])
    )

    def losses(d):
        return [
            json.loads(ln)["loss"]
            for ln in (d / "metrics.jsonl").read_text().splitlines()
            if '"train"' in ln
        ]

    assert (
        losses(tmp_path / "pre") == losses(tmp_path / "raw") and len(losses(tmp_path / "raw")) == 4
    )
    assert (
        pre["final_eval_loss"] == raw["final_eval_loss"]
        and pre["tokens_seen"] == raw["tokens_seen"] == 4 * 4 * 32
    )
    with pytest.raises(ValueError, match="holds 32-token sequences but --max_length is 16"):
        run(parse_args(["--output_dir", str(tmp_path / "bad"), "--tokenized_dir", str(tokens),
                        *common[:6], "--max_length", "16", *common[8:]]))  # fmt: skip


# --- schedules -------------------------------------------------------------------------------------
def test_cosine_schedule_with_warmup_and_floor():
    kw = {"num_training_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1}
    assert [lr_multiplier(s, "cosine", **kw) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    for s in (10, 33, 55, 80, 100):
        p = (s - 10) / 90
        assert lr_multiplier(s, "cosine", **kw) == pytest.approx(
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)), abs=1e-12
        )
    assert lr_multiplier(150, "cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(55, "linear", **kw) == pytest.approx(0.5)


def test_relora_jagged_cosine_restarts_from_zero_each_cycle():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = get_scheduler(
        opt,
        "cosine_restarts",
        num_training_steps=100,
        warmup_steps=5,
        cycle_length=20,
        restart_warmup_steps=4,
    )
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    kw = {"num_training_steps": 100, "warmup_steps": 5, "min_lr_ratio": 0.1}
    for cycle_start in (20, 40, 60, 80):
        assert lrs[cycle_start] == 0.0
        envelope = 2.0 * lr_multiplier(cycle_start + 4, "cosine", **kw)
        # linear re-warm-up to the envelope
        assert lrs[cycle_start + 2] == pytest.approx(envelope / 2)
        assert lrs[cycle_start + 4] == pytest.approx(envelope)
        assert lrs[cycle_start + 10] == pytest.approx(
            2.0 * lr_multiplier(cycle_start + 10, "cosine", **kw)
        )
    with pytest.raises(ValueError, match="--restart_warmup_steps must be in"):
        get_scheduler(
            opt,
            "cosine_restarts",
            num_training_steps=100,
            warmup_steps=5,
            cycle_length=20,
            restart_warmup_steps=20,
        )
    with pytest.raises(ValueError, match="--warmup_steps 30 is longer than --cycle_length 20"):
        get_scheduler(
            opt, "cosine_restarts", num_training_steps=100, warmup_steps=30, cycle_length=20
        )
    with pytest.raises(ValueError, match="--scheduler must be"):
        get_scheduler(opt, "step", num_training_steps=100, warmup_steps=5)


# --- arguments and presets -------------------------------------------------------------------------
def test_batch_arguments_derive_accumulation_and_check_divisibility():
    a = parse_args(["--output_dir", "x", "--batch_size", "4", "--total_batch_size", "32"])
    assert (
        a.gradient_accumulation_for(1) == 8
        and a.gradient_accumulation_for(2) == 4
        and a.global_batch_size(4) == 32
    )
    with pytest.raises(
        ValueError,
        match="--total_batch_size 32 must be a multiple of --batch_size x world size = 4 x 3",
    ):
        a.gradient_accumulation_for(3)
    b = parse_args(
        [
            "--output_dir",
            "x",
            "--batch_size",
            "4",
            "--total_batch_size",
            "32",
            "--gradient_accumulation",
            "2",
        ]
    )
    with pytest.raises(ValueError, match="--gradient_accumulation 2 disagrees"):
        b.gradient_accumulation_for(1)
    c = parse_args(
        [
            "--output_dir",
            "x",
            "--batch_size",
            "4",
            "--max_length",
            "128",
            "--max_train_tokens",
            "1M",
        ]
    )
    assert c.num_training_steps_from_tokens(2) == 10**6 // (8 * 128)


@pytest.mark.parametrize(
    ("argv", "error", "match"),
    [
        (["--output_dir", ""], ValueError, "--output_dir is required"),
        (["--rank", "0"], ValueError, "--rank must be a positive int, got 0"),
        (["--rand_ratio", "1.5"], ValueError, r"--rand_ratio must be in \[0, 1\], got 1.5"),
        (["--min_lr_ratio", "0"], ValueError, r"--min_lr_ratio must be in \(0, 1\]"),
        (["--use_peft"], NotImplementedError, "original ReLoRA.*pass --use_peft --golore"),
        (
            ["--golore"],
            ValueError,
            "--golore selects the ReLoRA-structure path and needs --use_peft",
        ),
        (["--use_peft", "--golore", "--optimizer", "galore_adamw"], ValueError, "plain optimizer"),
        (["--max_train_tokens", "lots"], ValueError, "--max_train_tokens must look like 100M"),
        (["--vocab_size", "big"], ValueError, "--vocab_size must be an int or 'auto'"),
    ],
)
def test_argument_errors_name_the_flag(argv, error, match):
    with pytest.raises(error, match=match):
        parse_args(["--output_dir", "x", *argv])


def test_shipped_json_configs_are_the_presets():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    assert names == sorted(MODEL_CONFIGS)
    for name in names:
        assert json.loads((CONFIG_DIR / f"{name}.json").read_text()) == MODEL_CONFIGS[name], name
        from_file = load_model_config(CONFIG_DIR / f"{name}.json").to_dict()
        from_preset = load_model_config(name).to_dict()
        assert {k: v for k, v in from_file.items() if k != "_name_or_path"} == {
            k: v for k, v in from_preset.items() if k != "_name_or_path"
        }
    c60 = load_model_config("llama_60m")
    assert (
        c60.hidden_size,
        c60.intermediate_size,
        c60.num_hidden_layers,
        c60.num_attention_heads,
    ) == (512, 1376, 8, 8)
    with pytest.raises(ValueError, match="--model_config 'llama_3m' is neither a preset"):
        load_model_config("llama_3m")


def test_reference_style_config_files_are_read(tmp_path):
    # the GaLore repository's configs/llama_60m.json: max_sequence_length and pad_token_id -1
    ref = dict(MODEL_CONFIGS["llama_60m"], max_sequence_length=1024, pad_token_id=-1)
    ref.pop("max_position_embeddings")
    (tmp_path / "llama_60m.json").write_text(json.dumps(ref))
    cfg = load_model_config(tmp_path / "llama_60m.json", vocab_size=320)
    assert cfg.max_position_embeddings == 1024 and cfg.pad_token_id == 0 and cfg.vocab_size == 320
    (tmp_path / "gpt2.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="only LLaMA configs"):
        load_model_config(tmp_path / "gpt2.json")


def test_cli_rejects_unknown_commands():
    with pytest.raises(SystemExit, match="unknown command 'eval'"):
        main(["eval"])
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit):
        main(["pretokenize", "--help"])
    assert "--sequences_per_shard" in buf.getvalue()


def test_deepspeed_config_is_filled_from_the_flags_and_checked(tmp_path):
    from loralab.runners.c4.engine import Env, deepspeed_config

    env = Env(0, 2, 0, torch.device("cpu"))

    def cfg(body: dict, *flags: str) -> dict:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(body))
        args = parse_args(
            [
                "--output_dir",
                "x",
                "--batch_size",
                "4",
                "--grad_clipping",
                "1.0",
                "--deepspeed_config",
                str(path),
                *flags,
            ]
        )
        return deepspeed_config(args, env, accum=3)

    auto = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}  # fmt: skip
    filled = cfg(auto)
    assert (
        filled["train_batch_size"],
        filled["train_micro_batch_size_per_gpu"],
        filled["gradient_accumulation_steps"],
    ) == (24, 4, 3)
    assert filled["gradient_clipping"] == 1.0
    with pytest.raises(
        ValueError, match=r"train_batch_size=16 disagrees with the command line \(24\)"
    ):
        cfg(dict(auto, train_batch_size=16))
    with pytest.raises(ValueError, match="remove its 'optimizer'/'scheduler' sections"):
        cfg(dict(auto, optimizer={"type": "AdamW"}))
    # GaLore / GoLore run under ZeRO-1/2/3 (loralab.core.zero_views); --dtype bfloat16 there is
    # DeepSpeed's bf16 (float32 master partitions), as for AdamW
    galore = cfg(auto, "--optimizer", "galore_adamw")
    assert galore["zero_optimization"]["stage"] == 2 and galore["bf16"] == {"enabled": False}
    golore_bf16 = cfg(auto, "--optimizer", "golore_adamw", "--dtype", "bfloat16")
    assert golore_bf16["bf16"] == {"enabled": True}
    # an explicit bf16 section must agree with --dtype (else the run trains in another precision
    # than its summary says)
    with pytest.raises(
        ValueError,
        match=r"bf16.enabled=true disagrees with --dtype float32 \(--optimizer galore_adamw at ZeRO "
        r"stage 2 runs DeepSpeed's bf16 off\); set it to \"auto\"",
    ):
        cfg(dict(auto, bf16={"enabled": True}), "--optimizer", "galore_adamw")
    with pytest.raises(ValueError, match=r"bf16.enabled=false disagrees with --dtype bfloat16"):
        cfg(dict(auto, bf16={"enabled": False}), "--optimizer", "adamw", "--dtype", "bfloat16")
    with pytest.raises(
        ValueError,
        match=r"--optimizer galore_adamw under DeepSpeed ZeRO stage 0: disable bf16 in --deepspeed_config",
    ):
        cfg(dict(auto, zero_optimization={"stage": 0}, bf16={"enabled": True}), "--optimizer", "galore_adamw")  # fmt: skip
    # at stage 0 the runner casts the model itself (DeepSpeed's bf16 stays off)
    stage0 = dict(auto, zero_optimization={"stage": 0}, bf16={"enabled": "auto"})
    assert cfg(stage0, "--optimizer", "galore_adamw", "--dtype", "bfloat16")["bf16"] == {
        "enabled": False
    }
    assert cfg(stage0, "--optimizer", "adamw", "--dtype", "bfloat16")["bf16"] == {"enabled": True}
    with pytest.raises(
        ValueError, match=r"--use_peft --golore needs whole 2-D weights.*ZeRO stage 1"
    ):
        cfg(dict(auto, zero_optimization={"stage": 1}), "--use_peft", "--golore")
    assert (
        cfg(dict(auto, zero_optimization={"stage": 0}), "--optimizer", "golore_adamw")[
            "zero_optimization"
        ]["stage"]
        == 0
    )
    # ZeRO offload: every optimizer is a client optimizer of deepspeed.initialize, kept on the CPU
    # partitions (zero_force_ds_cpu_optimizer false), AdamW too; NVMe only for DeepSpeed's own state
    cpu = dict(auto, zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu"}})
    for optimizer in ("galore_adamw", "adamw", "sgd"):
        assert cfg(cpu, "--optimizer", optimizer)["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(
        ValueError,
        match=r"--optimizer golore_adamw does not run with zero_force_ds_cpu_optimizer: true",
    ):
        cfg(dict(cpu, zero_force_ds_cpu_optimizer=True), "--optimizer", "golore_adamw")
    offload = dict(auto, zero_optimization={"stage": 3, "offload_param": {"device": "nvme"}})
    with pytest.raises(
        ValueError,
        match=r"--optimizer galore_adamw does not run with DeepSpeed ZeRO offload to NVMe \(--deepspeed_config "
        r".*: zero_optimization\.offload_param on nvme\)",
    ):
        cfg(offload, "--optimizer", "galore_adamw")
    assert cfg(offload, "--optimizer", "adamw")["zero_optimization"]["stage"] == 3
    elastic = dict(auto, zero_optimization={"stage": 2, "elastic_checkpoint": True})
    with pytest.raises(
        ValueError, match=r"zero_optimization.elastic_checkpoint true cannot be resumed"
    ):
        cfg(elastic, "--optimizer", "adamw")
    with pytest.raises(FileNotFoundError, match=r"--deepspeed_config .* does not exist"):
        deepspeed_config(
            parse_args(["--output_dir", "x", "--deepspeed_config", str(tmp_path / "none.json")]),
            env,
            1,
        )
