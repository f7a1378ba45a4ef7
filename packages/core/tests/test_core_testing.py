"""The shared tiny models, tokenizer and batch makers."""

import pytest
import torch

from loralab.core.testing import (
    TINY_ARCHS,
    VOCAB_SIZE,
    freeing_deepspeed_shm_buffers,
    make_classification_batches,
    make_lm_batches,
    make_seq2seq_batches,
    offline_tokenizer,
    run_accelerate,
    run_torchrun,
    save_tiny,
    tiny_llama,
    tiny_model,
)

BATCHES = {
    "llama": lambda: make_lm_batches(1),
    "gpt2": lambda: make_lm_batches(1),
    "roberta": lambda: make_classification_batches(1),
    "t5": lambda: make_seq2seq_batches(1),
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_run_and_are_deterministic(arch):
    state = torch.get_rng_state()
    a, b = tiny_model(arch, seed=3), tiny_model(arch, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # building never touches the caller's RNG
    assert not a.training
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    loss = a(**BATCHES[arch]()[0]).loss
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert sum(p.numel() for p in a.parameters()) < 500_000


def test_tiny_model_unknown_arch():
    with pytest.raises(ValueError, match="arch must be one of llama, gpt2, roberta, t5"):
        tiny_model("bert")


def test_overrides_and_seeds_differ():
    m = tiny_llama(num_hidden_layers=3, hidden_size=32)
    assert len(m.model.layers) == 3 and m.config.hidden_size == 32
    assert not torch.equal(tiny_llama(0).lm_head.weight, tiny_llama(1).lm_head.weight)


def test_offline_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = offline_tokenizer()
    assert len(tok) == VOCAB_SIZE and tok.pad_token_id == 0 and tok.eos_token_id == 2
    text = "héllo, wörld ✓"
    ids = tok(text)["input_ids"]
    assert max(ids) < VOCAB_SIZE and tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    padded = tok(["a", "abc"], padding=True, return_tensors="pt")
    assert padded["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]


def test_save_tiny_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_llama()
    save_tiny(model, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(
        again.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    )
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token == "<pad>"


def test_batch_makers():
    lm = make_lm_batches(2, batch_size=3, seq_len=8, pad_last=2, seed=5)
    assert len(lm) == 2 and lm[0]["input_ids"].shape == (3, 8)
    b = lm[0]
    assert (b["attention_mask"][:, -2:] == 0).all() and (b["labels"][:, -2:] == -100).all()
    assert torch.equal(b["labels"][:, :-2], b["input_ids"][:, :-2])
    assert torch.equal(
        make_lm_batches(1, seed=5)[0]["input_ids"], make_lm_batches(1, seed=5)[0]["input_ids"]
    )
    cls = make_classification_batches(1, num_labels=3)[0]
    assert (
        torch.equal(cls["labels"], cls["input_ids"][:, 1] % 3)
        and (cls["input_ids"][:, 0] == 1).all()
    )
    reg = make_classification_batches(1, num_labels=1)[0]
    assert reg["labels"].dtype == torch.float32
    s2s = make_seq2seq_batches(1, src_len=10, tgt_len=4)[0]
    assert s2s["input_ids"].shape == (2, 10) and s2s["labels"].shape == (2, 4)


FAILING_WORKER = """\
import sys
print("worker stdout line")
sys.stderr.write("worker failed on purpose\\n")
sys.exit(1)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("launch", [run_torchrun, run_accelerate], ids=lambda f: f.__name__)
def test_launchers_fail_with_the_workers_output(launch, tmp_path):
    # --multi_gpu needs 2 processes; each launch of this 4-line script takes ~8 s
    if launch is run_accelerate:
        pytest.importorskip("accelerate")
    script = tmp_path / "fail.py"
    script.write_text(FAILING_WORKER)
    with pytest.raises(AssertionError, match="worker failed on purpose") as info:
        launch(script, nproc=2, timeout=120)
    assert "worker stdout line" in str(info.value)


def test_zero3_gather_peak_counts_whole_parameters_at_each_gather():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    from loralab.core.testing import zero3_gather_peak

    class Status:
        def __init__(self, name):
            self.name = name

    model = tiny_llama()
    for p in model.parameters():  # marked as deepspeed.zero.Init marks a partitioned parameter
        p.ds_id, p.ds_status, p.ds_numel = 0, Status("NOT_AVAILABLE"), p.numel()
    block = list(model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    enter = GatheredParameters.__enter__
    with zero3_gather_peak(model) as seen:
        for p in block:
            p.ds_status = Status("AVAILABLE")
        with GatheredParameters([]):  # no ZeRO-3 parameter: a no-op that still counts
            pass
    assert GatheredParameters.__enter__ is enter
    in_blocks = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
    assert seen == {
        "peak": sum(p.numel() for p in block),
        "bound": total - in_blocks + sum(p.numel() for p in block),
        "total": total,
        "gathers": 1,
    }


def test_freeing_deepspeed_shm_buffers_deletes_only_what_appeared_in_the_block():
    from pathlib import Path

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    older = shm / "deepspeed_allreduce_buffer_0_test_older_0"
    older.write_bytes(b"x")
    other = shm / "loralab_test_not_a_deepspeed_buffer"
    try:
        with freeing_deepspeed_shm_buffers() as free_now:
            first = shm / "deepspeed_allreduce_buffer_0_test_first_0"
            first.write_bytes(b"x")
            free_now()  # frees what appeared so far
            assert not first.exists()
            second = shm / "deepspeed_allreduce_buffer_0_test_second_1"
            second.write_bytes(b"x")
            other.write_bytes(b"x")
        assert not second.exists()  # and the rest at the end of the block
        assert older.exists() and other.exists()  # not ours, or not DeepSpeed's: kept
    finally:
        older.unlink(missing_ok=True)
        other.unlink(missing_ok=True)


def test_run_docstring_examples_fails_on_a_wrong_example(tmp_path, monkeypatch):
    from loralab.core.testing import package_modules, run_docstring_examples

    pkg = tmp_path / "docpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text('"""\n>>> 1 + 1\n2\n"""\n')
    (pkg / "bad.py").write_text('"""\n>>> 1 + 1\n3\n"""\n')
    (pkg / "__main__.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_modules("docpkg") == ["docpkg", "docpkg.bad", "docpkg.good"]  # no __main__
    run_docstring_examples("docpkg.good")
    with pytest.raises(AssertionError, match=r"docpkg.bad: 1 of 1 examples failed"):
        run_docstring_examples("docpkg.bad")
