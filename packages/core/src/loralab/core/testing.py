"""Tiny models, an offline tokenizer and batch makers shared by every loralab package's tests.

Everything is built from configs with fixed seeds: no hub download, deterministic, fast on a CPU.
Models are created under ``torch.random.fork_rng`` so building one never changes the caller's RNG.

Example:
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> model = tiny_llama()
    >>> batch = make_lm_batches(1, vocab_size=model.config.vocab_size)[0]
    >>> model(**batch).loss.shape
    torch.Size([])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "TINY_ARCHS",
    "VOCAB_SIZE",
    "as_zero12_partition",
    "free_port",
    "freeing_deepspeed_shm_buffers",
    "fully_shard_model",
    "gradient_sums_peak",
    "make_classification_batches",
    "make_lm_batches",
    "make_seq2seq_batches",
    "offline_tokenizer",
    "package_modules",
    "run_accelerate",
    "run_docstring_examples",
    "run_torchrun",
    "save_tiny",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_model",
    "tiny_roberta",
    "tiny_t5",
    "zero3_gather_peak",
]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""Vocabulary of :func:`offline_tokenizer` (256 byte symbols + 4 specials); tiny models use it too."""

Arch = Literal["llama", "gpt2", "roberta", "t5"]
TINY_ARCHS: tuple[Arch, ...] = ("llama", "gpt2", "roberta", "t5")


_M = TypeVar("_M", bound=nn.Module)


def _seeded(seed: int, build: Callable[[], _M]) -> _M:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def tiny_llama(
    seed: int = 0, *, hidden_size: int = 64, num_hidden_layers: int = 2, **overrides: Any
) -> PreTrainedModel:
    """A random ``LlamaForCausalLM``: hidden 64, 2 layers, 4 heads (2 KV heads), intermediate 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return _seeded(seed, lambda: LlamaForCausalLM(LlamaConfig(**cfg)))


def tiny_gpt2(
    seed: int = 0, *, n_embd: int = 64, n_layer: int = 2, **overrides: Any
) -> PreTrainedModel:
    """A random ``GPT2LMHeadModel`` (its attention and MLP are ``Conv1D`` layers)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(overrides)
    return _seeded(seed, lambda: GPT2LMHeadModel(GPT2Config(**cfg)))


def tiny_roberta(
    seed: int = 0,
    *,
    num_labels: int = 2,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    **overrides: Any,
) -> PreTrainedModel:
    """A random ``RobertaForSequenceClassification`` with ``num_labels`` classes (1 = regression)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=260,
        num_labels=num_labels,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    return _seeded(seed, lambda: RobertaForSequenceClassification(RobertaConfig(**cfg)))


def tiny_t5(
    seed: int = 0, *, d_model: int = 64, num_layers: int = 2, **overrides: Any
) -> PreTrainedModel:
    """A random ``T5ForConditionalGeneration`` (2 encoder + 2 decoder blocks)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    cfg.update(overrides)
    return _seeded(seed, lambda: T5ForConditionalGeneration(T5Config(**cfg)))


_BUILDERS: dict[str, Callable[..., PreTrainedModel]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "roberta": tiny_roberta,
    "t5": tiny_t5,
}


def tiny_model(arch: Arch, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """One of :data:`TINY_ARCHS` by name."""
    if arch not in _BUILDERS:
        raise ValueError(f"arch must be one of {', '.join(TINY_ARCHS)}, got {arch!r}")
    return _BUILDERS[arch](seed, **overrides)


def offline_tokenizer(model_max_length: int = 256, padding_side: str = "right"):
    """A byte-level ``PreTrainedTokenizerFast`` built without any download.

    256 byte symbols (every UTF-8 text is representable) plus ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2),
    ``<unk>`` (3). It saves and reloads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    byte_symbols.sort()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for sym in byte_symbols:
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side=padding_side,
    )


def save_tiny(
    model: PreTrainedModel, path: str | os.PathLike[str], *, tokenizer: bool = True
) -> Path:
    """Save ``model`` (and :func:`offline_tokenizer`) so ``from_pretrained(path)`` loads them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer:
        offline_tokenizer().save_pretrained(path)
    return path


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_lm_batches(
    n: int,
    batch_size: int = 2,
    seq_len: int = 16,
    *,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
    pad_last: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``n`` causal-LM batches: ``input_ids``, ``attention_mask``, ``labels`` (= ids, -100 on padding).

    ``pad_last`` right-pads that many positions of every sequence, to exercise masking.
    """
    g = _gen(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab_size, (batch_size, seq_len), generator=g)
        mask = torch.ones_like(ids)
        if pad_last:
            mask[:, seq_len - pad_last :] = 0
            ids = ids.masked_fill(mask == 0, 0)
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def make_classification_batches(
    n: int,
    batch_size: int = 4,
    seq_len: int = 16,
    *,
    num_labels: int = 2,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``n`` sequence-classification batches whose label is a learnable function of the tokens.

    The label is ``(first token) mod num_labels`` (a float target for regression when
    ``num_labels == 1``), so tiny models can actually fit it in a few steps.
    """
    g = _gen(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab_size, (batch_size, seq_len), generator=g)
        ids[:, 0] = 1  # <s>, as RoBERTa expects
        if num_labels == 1:
            labels = ids[:, 1].float() / vocab_size
        else:
            labels = ids[:, 1] % num_labels
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def make_seq2seq_batches(
    n: int,
    batch_size: int = 2,
    src_len: int = 16,
    tgt_len: int = 8,
    *,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``n`` encoder-decoder batches (``input_ids``, ``attention_mask``, ``labels``)."""
    g = _gen(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab_size, (batch_size, src_len), generator=g)
        labels = torch.randint(4, vocab_size, (batch_size, tgt_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def fully_shard_model(model: nn.Module) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to ``model`` in place, as the runners' FSDP2 engine does: each
    transformer block (the model's ``_no_split_modules`` classes), the ``transformers`` model inside a
    PEFT wrapper, then the root. Needs the process group (every rank calls it).

    Example:
        >>> fully_shard_model(tiny_llama())  # doctest: +SKIP
    """
    from torch.distributed.fsdp import fully_shard

    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None) if base is not None else None
    inner = inner if isinstance(inner, nn.Module) else model
    blocks = set(getattr(inner, "_no_split_modules", None) or ())
    for module in [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(module)
    if inner is not model:
        fully_shard(inner)
    fully_shard(model)
    return model


def package_modules(package: str) -> list[str]:
    """The names of ``package`` and of every module below it (``__main__`` modules, which run a
    command when imported, left out): what a test of the docstring examples walks, so that a new
    module cannot be missed.

    Example:
        >>> package_modules("loralab.core")[:2]
        ['loralab.core', 'loralab.core.adamw']
    """
    import importlib
    import pkgutil

    root = importlib.import_module(package)
    below = pkgutil.walk_packages(root.__path__, prefix=package + ".")
    return [package, *sorted(m.name for m in below if not m.name.endswith(".__main__"))]


def run_docstring_examples(name: str) -> None:
    """Run the examples in the docstrings of module ``name`` as loralab writes them (``...`` matches
    anything, whitespace runs compare equal); raise ``AssertionError`` naming the module and the
    count of failures (doctest prints each one).

    Example:
        >>> run_docstring_examples("loralab.core.adamw")
    """
    import doctest
    import importlib

    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    if result.failed:
        raise AssertionError(f"{name}: {result.failed} of {result.attempted} examples failed")


def free_port() -> int:
    """A TCP port that is free right now on localhost (for a multi-process test's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_SHM = Path("/dev/shm")
_DEEPSPEED_SHM_BUFFERS = "deepspeed_allreduce_buffer_*"


@contextmanager
def freeing_deepspeed_shm_buffers() -> Iterator[Callable[[], None]]:
    """Delete the shared-memory buffers DeepSpeed's CPU backend left behind in the block's processes.

    Every DeepSpeed process on the CPU accelerator builds its shared-memory all-reduce op and maps a
    ~66 MiB file ``/dev/shm/deepspeed_allreduce_buffer_<n>_<addr>_<port>_<rank>`` that nobody
    unlinks, even at a clean exit: a test suite with dozens of launches filled 16 GiB of RAM-backed
    ``/dev/shm``. Files that existed before the block are left alone. The block receives a function
    that frees what is there so far (for a long block, such as a test session, to call between tests).

    Example:
        >>> with freeing_deepspeed_shm_buffers() as free_now:
        ...     free_now()  # after run_accelerate("worker.py", ...)
    """
    before = set(_SHM.glob(_DEEPSPEED_SHM_BUFFERS))

    def free_now() -> None:
        for path in set(_SHM.glob(_DEEPSPEED_SHM_BUFFERS)) - before:
            path.unlink(missing_ok=True)

    try:
        yield free_now
    finally:
        free_now()


def _run_launcher(cmd: list[str], env: dict[str, str], timeout: float) -> None:
    import subprocess

    with freeing_deepspeed_shm_buffers():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed (exit {proc.returncode})\n"
        f"--- stderr (end) ---\n{proc.stderr[-4000:]}\n"
        f"--- stdout (end) ---\n{proc.stdout[-2000:]}"
    )


def run_torchrun(
    script: str | os.PathLike[str], *args: str, nproc: int = 2, timeout: float = 600
) -> None:
    """Run ``script`` under ``torch.distributed.run`` with ``nproc`` CPU processes (gloo), one thread each.

    Raises ``AssertionError`` with the end of the processes' stderr and stdout if any of them fails, so
    a test that calls it reads like the single-process check it is compared with.

    Example:
        >>> run_torchrun("worker.py", "/tmp/out", nproc=2)  # doctest: +SKIP
    """
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-port", str(free_port()), str(script), *map(str, args)]
    _run_launcher(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, timeout)


def run_accelerate(
    script: str | os.PathLike[str], *args: str, nproc: int = 2, timeout: float = 600
) -> None:
    """Run ``script`` under ``accelerate launch --multi_gpu`` with ``nproc`` CPU processes, one thread each.

    ``--multi_gpu`` is accelerate's torchrun launcher; the script makes it multi-CPU with gloo by
    creating ``Accelerator(cpu=True)`` (accelerate's ``--cpu`` multi-process launcher goes through
    mpirun instead). No GPU is visible (``CUDA_VISIBLE_DEVICES=""``) and DeepSpeed, if the script uses
    it, runs on its CPU accelerator (``DS_ACCELERATOR=cpu``); mixed precision and dynamo are off.
    ``--multi_gpu`` needs ``nproc >= 2``. Raises ``AssertionError`` with the end of the processes' stderr and stdout if any of them fails.

    Example:
        >>> run_accelerate("worker.py", "/tmp/out", nproc=2, timeout=300)  # doctest: +SKIP
    """
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", str(nproc), "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port()), str(script), *map(str, args)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
    }
    _run_launcher(cmd, env, timeout)


def as_zero12_partition(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], pad: int = 3
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Do to ``optimizer`` what DeepSpeed ZeRO-1/2 does, in one process or on each rank of the
    default process group.

    ``params`` (the trainable parameters, all in the optimizer's first and only param group) become
    views of one flat buffer (padded by ``pad`` elements, as DeepSpeed aligns it; the padded size
    must split evenly over the ranks), and the group holds a copy of this rank's equal slice of it
    (the fp32 master partition; the whole buffer with one process). Returns ``hand_gradient()``, to
    call after backward (averages the gradients over the ranks and moves this rank's slice into the
    partition's, as DeepSpeed's step does) and ``copy_back()``, to call after the optimizer step
    (every rank's partition back into the model's buffer). For fast tests of the optimizers' ZeRO
    path (:mod:`loralab.core.zero_views`) with split points of the test's choosing (``pad`` and the
    order of ``params`` move them); the real engines run in the multi-process tests.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> opt = torch.optim.SGD([w], lr=0.5)
        >>> hand_gradient, copy_back = as_zero12_partition(opt, [w])
        >>> (w.sum()).backward(); hand_gradient(); opt.step(); copy_back()
        >>> w.detach()
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    import torch.distributed as dist

    if len(optimizer.param_groups) != 1:
        raise ValueError(
            f"as_zero12_partition: expects one param group, got {len(optimizer.param_groups)}"
        )
    ranks = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ranks else (0, 1)
    total = sum(p.numel() for p in params) + pad
    if total % world:
        raise ValueError(
            f"as_zero12_partition: {total} elements with the padding do not split over {world} "
            "ranks; choose pad so that they do"
        )
    size = total // world
    buf = torch.zeros(total, dtype=params[0].dtype)
    off = 0
    for p in params:
        buf[off : off + p.numel()].copy_(p.detach().reshape(-1))
        p.data = buf[off : off + p.numel()].view(p.shape)
        off += p.numel()
    master = nn.Parameter(buf[rank * size : (rank + 1) * size].clone())
    optimizer.param_groups[0]["params"] = [master]

    def hand_gradient() -> None:
        zeros = [torch.zeros(p.numel(), dtype=buf.dtype) for p in params]
        grads = [z if p.grad is None else p.grad.reshape(-1) for z, p in zip(zeros, params)]
        whole = torch.cat([*grads, torch.zeros(pad, dtype=buf.dtype)])
        if world > 1:
            dist.all_reduce(whole)
            whole /= world
        master.grad = whole[rank * size : (rank + 1) * size].clone()
        for p in params:
            p.grad = None

    def copy_back() -> None:
        if world == 1:
            buf.copy_(master.detach())
        else:
            dist.all_gather_into_tensor(buf, master.detach())

    return hand_gradient, copy_back


@contextmanager
def gradient_sums_peak() -> Iterator[dict[str, int]]:
    """Watch how many float32 gradient sums loralab's estimators hold at once.

    While open, every per-layer sum an estimate keeps in :class:`loralab.core.gradient_sums.GradientSums` is
    counted: the hook path and :func:`~loralab.core.gradients.estimate_gradients_from_step` (every
    target's sum until the last batch), and the block-wise order in place (one block's sums at a time;
    under FSDP2 this rank's rows of them). The yielded dict holds ``peak_layers`` (the most layers
    whose sums existed at once), ``peak`` (the most elements at once) and ``layers`` (the distinct
    layers summed). Sums the caller keeps as results (no consumer) count until the estimate returns.

    Example:
        >>> from loralab.core.testing import tiny_llama, make_lm_batches
        >>> from loralab.core.gradients import estimate_gradients
        >>> with gradient_sums_peak() as seen:  # block-wise: one block's 7 layers at a time
        ...     _ = estimate_gradients(tiny_llama(), make_lm_batches(2), blockwise=True,
        ...                            consumer=lambda n, g: None, progress=False)
        >>> seen["peak_layers"], seen["layers"]
        (7, 14)
    """
    from loralab.core import gradient_sums

    seen = {"peak_layers": 0, "peak": 0, "layers": 0}
    live: dict[tuple[int, str], int] = {}  # (id of the dict, layer) -> elements
    names: set[str] = set()

    def note() -> None:
        seen["peak_layers"] = max(seen["peak_layers"], len(live))
        seen["peak"] = max(seen["peak"], sum(live.values()))

    class CountedSums(dict):
        def __setitem__(self, name: str, value: torch.Tensor) -> None:
            super().__setitem__(name, value)
            live[(id(self), name)] = value.numel()
            names.add(name)
            seen["layers"] = len(names)
            note()

        def pop(self, name: str, *default: Any) -> Any:
            live.pop((id(self), name), None)
            return super().pop(name, *default)

        def __del__(self) -> None:
            for key in [k for k in live if k[0] == id(self)]:
                del live[key]

    original = gradient_sums.GradientSums

    class Counted(original):  # type: ignore[valid-type, misc]
        def __init__(self) -> None:
            super().__init__()
            self.sums = CountedSums()

    gradient_sums.GradientSums = Counted  # type: ignore[misc, assignment]
    try:
        yield seen
    finally:
        gradient_sums.GradientSums = original  # type: ignore[misc]


@contextmanager
def zero3_gather_peak(model: nn.Module) -> Iterator[dict[str, int]]:
    """Watch how much of a DeepSpeed ZeRO-3 partitioned ``model`` is gathered whole at once.

    While open, every entry into ``deepspeed.zero.GatheredParameters`` (loralab's gathers and anyone
    else's) counts the elements of ``model``'s ZeRO-3 parameters that are whole (``AVAILABLE``) at
    that moment. The yielded dict holds ``peak`` (the largest count), ``bound`` (the largest decoder
    block's elements plus those outside every block: embeddings, final norm, head, i.e. what the
    block-wise estimate may hold at once), ``total`` (every element) and ``gathers`` (the entries).
    Without DeepSpeed, or with no partitioned parameter, nothing is counted.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> with zero3_gather_peak(tiny_llama()) as seen:  # not partitioned: nothing to count
        ...     pass
        >>> seen
        {'peak': 0, 'bound': 0, 'total': 0, 'gathers': 0}
    """
    from loralab.core.offload import find_blocks

    def numel(ps: Iterable[Any]) -> int:
        return sum(int(p.ds_numel) for p in ps)

    params = [p for p in model.parameters() if hasattr(p, "ds_id") and hasattr(p, "ds_status")]
    seen = {"peak": 0, "bound": 0, "total": numel(params), "gathers": 0}
    if not params:
        yield seen
        return
    blocks = [{id(p) for p in b.parameters()} for b in find_blocks(model).values()]
    in_blocks = set().union(*blocks)
    glue = numel(p for p in params if id(p) not in in_blocks)
    seen["bound"] = glue + max(numel(p for p in params if id(p) in b) for b in blocks)
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    enter = GatheredParameters.__enter__

    def counting_enter(self: Any) -> Any:
        out = enter(self)
        whole = numel(p for p in params if p.ds_status.name == "AVAILABLE")
        seen["peak"] = max(seen["peak"], whole)
        seen["gathers"] += 1
        return out

    GatheredParameters.__enter__ = counting_enter
    try:
        yield seen
    finally:
        GatheredParameters.__enter__ = enter
