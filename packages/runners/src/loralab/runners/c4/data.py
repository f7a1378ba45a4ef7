"""C4 text → token sequences: local shards or a streamed hub dataset, packing, disjoint streams, resume.

Layout of the data (why it looks like this):

- **Documents** come from local json/jsonl(.gz) shards in C4's own format (one JSON object per line
  with ``text``, ``timestamp``, ``url``; files ``c4-train.00000-of-01024.json.gz``) read by
  :class:`LocalSource`, or from ``datasets.load_dataset(name, config, streaming=True)``
  (:class:`HubSource`, ``allenai/c4`` / ``en`` by default).
- **Streams**: the documents are split into ``S`` disjoint streams (document ``i`` → stream
  ``i mod S`` locally; ``datasets.distributed.split_dataset_by_node`` for the hub). Micro-batch ``m``
  of an optimizer step is read from stream ``m mod S`` and runs on rank ``m mod W``, so each rank
  reads only its own streams, and the global batch of a step depends on ``S`` but not on the number
  of processes ``W`` (``S`` defaults to ``W``; ``S`` must be a multiple of ``W``). A 2-GPU run can be
  replayed exactly on one process with ``--data_streams 2``.
- **Sequences**: ``pack`` joins a stream's documents with EOS and cuts full ``max_length`` windows
  (no padding); ``truncate`` is the GaLore reference (one document per sequence, truncated, padded).
- **State**: each :class:`SequenceStream` saves how many documents it consumed and the tokens it
  has not emitted yet, so a resumed run continues at exactly the next sequence.

Example:
    >>> from loralab.core.testing import offline_tokenizer
    >>> from loralab.runners.c4.data import ListSource, SequenceStream
    >>> stream = SequenceStream(ListSource(["hello world"] * 10), offline_tokenizer(), max_length=8)
    >>> [len(s) for s in stream.next_sequences(2)]
    [8, 8]
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "DataExhaustedError",
    "HubSource",
    "ListSource",
    "LocalSource",
    "SequenceStream",
    "TokenizedSource",
    "collate",
    "find_shards",
    "pretokenize",
    "stream_for_microbatch",
]

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
TOKEN_META = "tokens_meta.json"


class DataExhaustedError(RuntimeError):
    """A data stream ran out of documents / sequences before the run's last step."""


class DocumentSource(Protocol):
    """Something that yields the texts of stream ``stream`` of ``num_streams``, skipping ``skip``."""

    def iter_stream(self, stream: int, num_streams: int, skip: int = 0) -> Iterator[str]: ...


def find_shards(spec: str | os.PathLike[str], split: str | None = None) -> list[Path]:
    """The json/jsonl(.gz) files of ``spec`` (a file, a directory or a glob), sorted.

    For a directory holding C4's ``c4-train.*`` / ``c4-validation.*`` files, ``split`` picks one
    split (files whose name contains it); if no file names the split, all files are used.
    """
    spec = str(spec)
    path = Path(spec)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.name.endswith(SHARD_SUFFIXES)
        )
        if split is not None:
            named = [p for p in files if split in p.name]
            if named:
                files = named
            elif any(s in p.name for p in files for s in ("train", "validation")):
                files = []
    else:
        files = sorted(
            Path(p) for p in glob.glob(spec, recursive=True) if p.endswith(SHARD_SUFFIXES)
        )
    if not files:
        raise FileNotFoundError(
            f"no json/jsonl(.gz) shards{f' for split {split!r}' if split else ''} found at {spec!r} "
            f"(expected C4's format: c4-{split or 'train'}.00000-of-01024.json.gz with one JSON object per line)"
        )
    return files


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


class LocalSource:
    """Documents of local C4-format shards; file order shuffled by ``shuffle_seed`` (None: sorted).

    Document ``i`` of the concatenated files goes to stream ``i mod num_streams``; only the kept
    lines are parsed, so skipping on resume costs a decompression pass, not tokenization.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]],
        *,
        text_field: str = "text",
        shuffle_seed: int | None = 42,
    ) -> None:
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("LocalSource needs at least one shard file")
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self.files)
        self.text_field = text_field

    def iter_stream(self, stream: int, num_streams: int, skip: int = 0) -> Iterator[str]:
        i = kept = 0
        for path in self.files:
            with _open_text(path) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    mine = i % num_streams == stream
                    i += 1
                    if not mine:
                        continue
                    kept += 1
                    if kept <= skip:
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(
                            f"{path}:{lineno}: not a JSON object per line (C4 format): {e}"
                        ) from None
                    if self.text_field not in record:
                        raise KeyError(
                            f"{path}:{lineno}: record has no {self.text_field!r} field (has {sorted(record)}); set --text_field"
                        )
                    yield record[self.text_field]


class ListSource:
    """Documents from an in-memory list (tests, demos). Document ``i`` → stream ``i mod S``."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)

    def iter_stream(self, stream: int, num_streams: int, skip: int = 0) -> Iterator[str]:
        mine = self.texts[stream::num_streams]
        yield from mine[skip:]


class HubSource:
    """``datasets.load_dataset(name, config, split=split, streaming=True)``, shuffled, split by stream.

    ``split_dataset_by_node(rank=stream, world_size=num_streams)`` gives each stream whole shards
    when their count divides, else every ``num_streams``-th example; resume skips the consumed ones.
    ``data_files`` (with ``name="json"``) streams local files through the same code path.
    """

    def __init__(
        self,
        name: str = "allenai/c4",
        config: str | None = "en",
        split: str = "train",
        *,
        text_field: str = "text",
        shuffle_seed: int | None = 42,
        shuffle_buffer: int = 10_000,
        data_files: Any = None,
    ) -> None:
        self.name, self.config, self.split = name, config, split
        self.text_field, self.shuffle_seed, self.shuffle_buffer = (
            text_field,
            shuffle_seed,
            shuffle_buffer,
        )
        self.data_files = data_files

    def _dataset(self):
        import datasets

        kw: dict[str, Any] = {"split": self.split, "streaming": True}
        if self.data_files is not None:
            kw["data_files"] = self.data_files
        try:
            ds = datasets.load_dataset(self.name, self.config, **kw)
        except Exception as e:  # network / hub errors: say which flag to change
            raise RuntimeError(
                f"could not stream --dataset {self.name!r} (config {self.config!r}, split {self.split!r}): {e}. "
                "Offline? Download C4 shards and pass --train_data/--eval_data, or use --tokenized_dir."
            ) from e
        if self.shuffle_seed is not None and self.shuffle_buffer > 0:
            ds = ds.shuffle(seed=self.shuffle_seed, buffer_size=self.shuffle_buffer)
        return ds

    def iter_stream(self, stream: int, num_streams: int, skip: int = 0) -> Iterator[str]:
        from datasets.distributed import split_dataset_by_node

        ds = self._dataset()
        if num_streams > 1:
            ds = split_dataset_by_node(ds, rank=stream, world_size=num_streams)
        if skip:
            ds = ds.skip(skip)
        for record in ds:
            if self.text_field not in record:
                raise KeyError(
                    f"--dataset {self.name!r} records have no {self.text_field!r} field (has {sorted(record)}); set --text_field"
                )
            yield record[self.text_field]


class SequenceStream:
    """Token sequences of one document stream, packed or truncated, with an exact resume state.

    Args:
        source: a document source (:class:`LocalSource`, :class:`HubSource`, :class:`ListSource`).
        tokenizer: a Hugging Face tokenizer.
        max_length: sequence length.
        packing: ``"pack"`` or ``"truncate"``.
        stream, num_streams: which stream of how many.
        chunk_docs: documents tokenized per tokenizer call.
    """

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: Any,
        max_length: int,
        *,
        packing: str = "pack",
        stream: int = 0,
        num_streams: int = 1,
        chunk_docs: int = 64,
    ) -> None:
        if packing not in ("pack", "truncate"):
            raise ValueError(f"packing must be 'pack' or 'truncate', got {packing!r}")
        if not 0 <= stream < num_streams:
            raise ValueError(f"stream must be in [0, {num_streams}), got {stream}")
        self.source, self.tokenizer, self.max_length, self.packing = (
            source,
            tokenizer,
            max_length,
            packing,
        )
        self.stream, self.num_streams, self.chunk_docs = stream, num_streams, chunk_docs
        self.eos = tokenizer.eos_token_id
        if packing == "pack" and self.eos is None:
            raise ValueError(
                "--packing pack joins documents with EOS, but the tokenizer has no eos_token; use --packing truncate"
            )
        self.docs_consumed = 0
        self.buffer: list[int] = []  # pack: pending tokens
        self.pending: list[list[int]] = []  # truncate: pending sequences
        self._docs: Iterator[str] | None = None
        self.exhausted = False

    # state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "docs_consumed": self.docs_consumed,
            "buffer": torch.tensor(self.buffer, dtype=torch.int64),
            "pending": [torch.tensor(s, dtype=torch.int64) for s in self.pending],
            "stream": self.stream,
            "num_streams": self.num_streams,
            "packing": self.packing,
            "max_length": self.max_length,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("stream", "num_streams", "packing", "max_length"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data state was saved with {key}={state[key]!r} but this run has {key}={getattr(self, key)!r}; "
                    "resume with the same --data_streams/--packing/--max_length"
                )
        self.docs_consumed = int(state["docs_consumed"])
        self.buffer = [int(t) for t in state["buffer"].tolist()]
        self.pending = [[int(t) for t in s.tolist()] for s in state["pending"]]
        self._docs = None
        self.exhausted = False

    # reading ----------------------------------------------------------------------------------
    def _next_docs(self) -> list[str]:
        if self._docs is None:
            self._docs = self.source.iter_stream(
                self.stream, self.num_streams, skip=self.docs_consumed
            )
        out = []
        for text in self._docs:
            out.append(text)
            if len(out) == self.chunk_docs:
                break
        return out

    def _fill(self) -> bool:
        docs = self._next_docs()
        if not docs:
            self.exhausted = True
            return False
        if self.packing == "pack":
            ids = self.tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
            for seq in ids:
                self.buffer.extend(seq)
                self.buffer.append(self.eos)
        else:
            ids = self.tokenizer(docs, max_length=self.max_length, truncation=True)["input_ids"]
            self.pending.extend(list(s) for s in ids if len(s) > 0)
        self.docs_consumed += len(docs)
        return True

    def next_sequences(self, n: int) -> list[list[int]]:
        """The next ``n`` sequences; :class:`DataExhaustedError` if the stream ends first."""
        out: list[list[int]] = []
        while len(out) < n:
            if self.packing == "pack":
                if len(self.buffer) >= self.max_length:
                    out.append(self.buffer[: self.max_length])
                    del self.buffer[: self.max_length]
                    continue
            elif self.pending:
                out.append(self.pending.pop(0))
                continue
            if not self._fill():
                raise DataExhaustedError(
                    f"data stream {self.stream}/{self.num_streams} ran out after {self.docs_consumed} documents"
                )
        return out


class TokenizedSource:
    """Packed token shards written by :func:`pretokenize`; sequence ``j`` → stream ``j mod S``.

    Streams share the same interface and state format as :class:`SequenceStream` (``docs_consumed``
    counts sequences here).
    """

    def __init__(self, directory: str | os.PathLike[str], split: str = "train") -> None:
        self.directory = Path(directory)
        meta_path = self.directory / TOKEN_META
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"--tokenized_dir {directory}: no {TOKEN_META} (write it with 'python -m loralab.runners.c4 pretokenize')"
            )
        self.meta = json.loads(meta_path.read_text())
        if split not in self.meta["splits"]:
            raise KeyError(
                f"--tokenized_dir {directory} has no {split!r} split (has {sorted(self.meta['splits'])})"
            )
        self.shards = [
            np.load(self.directory / f, mmap_mode="r") for f in self.meta["splits"][split]["files"]
        ]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.max_length = int(self.meta["max_length"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def sequence(self, j: int) -> list[int]:
        k = int(np.searchsorted(self.offsets, j, side="right")) - 1
        return self.shards[k][j - self.offsets[k]].astype(np.int64).tolist()

    def stream(self, stream: int, num_streams: int) -> _TokenStream:
        return _TokenStream(self, stream, num_streams)


class _TokenStream:
    packing = "pack"

    def __init__(self, source: TokenizedSource, stream: int, num_streams: int) -> None:
        self.source, self.stream, self.num_streams = source, stream, num_streams
        self.max_length = source.max_length
        self.docs_consumed = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "docs_consumed": self.docs_consumed,
            "buffer": torch.zeros(0, dtype=torch.int64),
            "pending": [],
            "stream": self.stream,
            "num_streams": self.num_streams,
            "packing": "pack",
            "max_length": self.max_length,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["stream"], state["num_streams"], state["max_length"]) != (
            self.stream,
            self.num_streams,
            self.max_length,
        ):
            raise ValueError(
                "token-shard state was saved with another --data_streams/--max_length; resume with the same ones"
            )
        self.docs_consumed = int(state["docs_consumed"])

    def next_sequences(self, n: int) -> list[list[int]]:
        first = self.stream + self.num_streams * self.docs_consumed
        idx = [first + self.num_streams * k for k in range(n)]
        if idx[-1] >= len(self.source):
            raise DataExhaustedError(
                f"token shards ran out after {self.docs_consumed} sequences of stream {self.stream}"
            )
        self.docs_consumed += n
        return [self.source.sequence(j) for j in idx]


def stream_for_microbatch(micro: int, num_streams: int) -> int:
    """Stream of micro-batch ``micro`` (counted over the whole global batch): ``micro mod S``."""
    return micro % num_streams


def collate(seqs: Sequence[Sequence[int]], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` (-100 on padding), right-padded to ``max_length``."""
    ids = torch.full((len(seqs), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), max_length), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = min(len(s), max_length)
        ids[i, :n] = torch.tensor(s[:n], dtype=torch.long)
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pretokenize(
    source: DocumentSource,
    tokenizer: Any,
    output_dir: str | os.PathLike[str],
    *,
    split: str = "train",
    max_length: int = 256,
    max_sequences: int | None = None,
    sequences_per_shard: int = 100_000,
    progress: bool = True,
) -> Path:
    """Tokenize and pack ``source`` into ``.npy`` token shards under ``output_dir`` (the GoLore README's step 1).

    Adds ``split`` to ``tokens_meta.json`` (so train and validation can share a directory). Token ids are
    stored as ``uint16`` when the vocabulary fits, else ``int32``.
    """
    from tqdm.auto import tqdm

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    stream = SequenceStream(source, tokenizer, max_length, packing="pack")
    files: list[str] = []
    total = 0
    bar = tqdm(total=max_sequences, desc=f"pretokenize {split}", unit="seq", disable=not progress)
    done = False
    while not done:
        want = (
            sequences_per_shard
            if max_sequences is None
            else min(sequences_per_shard, max_sequences - total)
        )
        rows: list[list[int]] = []
        while len(rows) < want:
            try:
                rows.extend(stream.next_sequences(1))
            except DataExhaustedError:
                done = True
                break
        if rows:
            name = f"{split}-{len(files):05d}.npy"
            np.save(out / name, np.asarray(rows, dtype=dtype))
            files.append(name)
            total += len(rows)
            bar.update(len(rows))
        if max_sequences is not None and total >= max_sequences:
            done = True
    bar.close()
    if total == 0:
        raise ValueError(
            f"pretokenize: the {split} source gave no full sequence of {max_length} tokens"
        )
    meta_path = out / TOKEN_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"splits": {}}
    if meta.get("max_length", max_length) != max_length:
        raise ValueError(
            f"{meta_path} was written with max_length={meta['max_length']}, not {max_length}"
        )
    meta.update(
        max_length=max_length,
        vocab_size=vocab,
        tokenizer=getattr(tokenizer, "name_or_path", ""),
        dtype=np.dtype(dtype).name,
    )
    meta["splits"][split] = {
        "files": files,
        "num_sequences": total,
        "documents": stream.docs_consumed,
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    logger.info("pretokenize: %d sequences of %d tokens (%s) in %s", total, max_length, split, out)
    return out


def eval_sequence_count(eval_tokens: int, max_length: int) -> int:
    return max(1, math.ceil(eval_tokens / max_length))
