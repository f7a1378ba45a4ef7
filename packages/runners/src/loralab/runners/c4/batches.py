"""Where C4's batches come from: the train / validation sources of the flags, the per-rank data streams,
and :class:`C4Batches`, the loop's :class:`~loralab.runners.loop.BatchSource` over them.

One optimizer step on rank ``r`` of ``W`` with ``A`` micro-batches: micro-batch ``a`` is global
micro-batch ``m = a·W + r`` and reads from data stream ``m mod S`` (see :mod:`.data`), so the global
batch of a step depends on ``S`` (``--data_streams``) but not on ``W``.

Example:
    >>> from loralab.core.testing import offline_tokenizer
    >>> from loralab.runners.c4.data import ListSource, SequenceStream
    >>> streams = {0: SequenceStream(ListSource(["hello world"] * 50), offline_tokenizer(), max_length=8)}
    >>> src = C4Batches(streams, batch_size=2, max_length=8, pad_id=0, vocab=260, num_streams=1)
    >>> [b["input_ids"].shape for b in src.next_batches(2)]
    [torch.Size([2, 8]), torch.Size([2, 8])]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from loralab.runners.c4.args import C4Args
from loralab.runners.c4.data import (
    DataExhaustedError,
    HubSource,
    LocalSource,
    SequenceStream,
    TokenizedSource,
    collate,
    eval_sequence_count,
    find_shards,
)
from loralab.runners.loop import DataExhausted

__all__ = ["C4Batches", "check_ids", "eval_batches", "eval_source", "make_streams", "train_source"]


class C4Batches:
    """This rank's micro-batches of each optimizer step, read from its data streams (a ``BatchSource``).

    ``tokens_seen`` (all ranks, updated by the recipe after each step) and every stream's position
    are its state; :meth:`state_dict` gathers every rank's streams, so the checkpoint's one
    ``trainer_state.json`` holds them all and each rank takes its own back on resume.
    """

    def __init__(
        self,
        streams: dict[int, Any],
        *,
        batch_size: int,
        max_length: int,
        pad_id: int,
        vocab: int,
        num_streams: int,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.streams, self.batch_size, self.max_length = streams, batch_size, max_length
        self.pad_id, self.vocab, self.num_streams = pad_id, vocab, num_streams
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.step_tokens = 0  # this rank's non-pad tokens in the last next_batches
        self.tokens_seen = 0

    def next_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        out, self.step_tokens = [], 0
        for a in range(n):
            stream = self.streams[(a * self.world + self.rank) % self.num_streams]
            try:
                seqs = stream.next_sequences(self.batch_size)
            except DataExhaustedError as exc:
                raise DataExhausted(str(exc)) from None
            batch = collate(seqs, self.max_length, self.pad_id)
            check_ids(batch, self.vocab)
            self.step_tokens += int(batch["attention_mask"].sum())
            out.append({k: v.to(self.device) for k, v in batch.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        mine = {str(s): _jsonable(st.state_dict()) for s, st in self.streams.items()}
        parts: list[Any] = [mine]
        if dist.is_initialized() and self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, mine)
        streams = {k: v for part in parts for k, v in part.items()}
        return {"tokens_seen": self.tokens_seen, "world": self.world, "streams": streams}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world"] != self.world:
            raise ValueError(
                f"the checkpoint was written by {state['world']} processes, this run has {self.world}: "
                "resume with the same number (each rank's data position is in it)"
            )
        self.tokens_seen = int(state["tokens_seen"])
        for s, stream in self.streams.items():
            saved = state["streams"][str(s)]
            stream.load_state_dict(
                {
                    **saved,
                    "buffer": torch.tensor(saved["buffer"], dtype=torch.int64),
                    "pending": [torch.tensor(p, dtype=torch.int64) for p in saved["pending"]],
                }
            )


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    """A stream's state with its token tensors as lists (the loop keeps the data position as JSON)."""
    return {
        **state,
        "buffer": state["buffer"].tolist(),
        "pending": [p.tolist() for p in state["pending"]],
    }


def train_source(args: C4Args) -> Any:
    if args.tokenized_dir is not None:
        return TokenizedSource(args.tokenized_dir, "train")
    if args.train_data is not None:
        return LocalSource(
            find_shards(args.train_data, "train"),
            text_field=args.text_field,
            shuffle_seed=args.shuffle_seed,
        )
    return HubSource(
        args.dataset,
        args.dataset_config,
        "train",
        text_field=args.text_field,
        shuffle_seed=args.shuffle_seed,
        shuffle_buffer=args.shuffle_buffer,
    )


def eval_source(args: C4Args) -> Any:
    if args.eval_data is not None:
        return LocalSource(
            find_shards(args.eval_data, "validation"), text_field=args.text_field, shuffle_seed=None
        )
    if args.tokenized_dir is not None:
        source = (
            TokenizedSource(args.tokenized_dir, "validation")
            if _has_split(args.tokenized_dir, "validation")
            else None
        )
        if source is not None:
            return source
    if args.train_data is not None:
        try:
            return LocalSource(
                find_shards(args.train_data, "validation"),
                text_field=args.text_field,
                shuffle_seed=None,
            )
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no validation shards next to --train_data {args.train_data}: pass --eval_data"
            ) from None
    if args.tokenized_dir is not None:
        raise FileNotFoundError(
            f"--tokenized_dir {args.tokenized_dir} has no validation split: pass --eval_data or pretokenize one"
        )
    return HubSource(
        args.dataset,
        args.dataset_config,
        "validation",
        text_field=args.text_field,
        shuffle_seed=None,
    )


def _has_split(directory: str, split: str) -> bool:
    meta = Path(directory) / "tokens_meta.json"
    return meta.is_file() and split in json.loads(meta.read_text()).get("splits", {})


def make_streams(
    args: C4Args, tokenizer: Any, rank: int, world: int, num_streams: int
) -> dict[int, Any]:
    source = train_source(args)
    streams: dict[int, Any] = {}
    for s in range(num_streams):
        if s % world != rank:
            continue
        if isinstance(source, TokenizedSource):
            if source.max_length != args.max_length:
                raise ValueError(
                    f"--tokenized_dir holds {source.max_length}-token sequences but --max_length is {args.max_length}"
                )
            streams[s] = source.stream(s, num_streams)
        else:
            streams[s] = SequenceStream(
                source,
                tokenizer,
                args.max_length,
                packing=args.packing,
                stream=s,
                num_streams=num_streams,
            )
    return streams


def eval_batches(
    args: C4Args, tokenizer: Any, rank: int, world: int
) -> list[dict[str, torch.Tensor]]:
    """The same held-out sequences every evaluation; sequence ``j`` is evaluated on rank ``j mod W``."""
    source = eval_source(args)
    n = eval_sequence_count(args.eval_tokens, args.max_length)
    if isinstance(source, TokenizedSource):
        seqs = [source.sequence(j) for j in range(min(n, len(source)))]
    else:
        stream = SequenceStream(source, tokenizer, args.max_length, packing=args.packing)
        seqs = []
        try:
            while len(seqs) < n:
                seqs.extend(stream.next_sequences(1))
        except DataExhaustedError:
            pass
    if not seqs:
        raise ValueError("the evaluation data gave no sequence")
    mine = seqs[rank::world]
    return [
        collate(mine[i : i + args.batch_size], args.max_length, tokenizer.pad_token_id or 0)
        for i in range(0, len(mine), args.batch_size)
    ]


def check_ids(batch: dict[str, torch.Tensor], vocab: int) -> None:
    top = int(batch["input_ids"].max())
    if top >= vocab:
        raise ValueError(
            f"token id {top} >= the model's vocab_size {vocab}: the tokenizer does not fit --model_config; pass --vocab_size auto or a matching --tokenizer"
        )
