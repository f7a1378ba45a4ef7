"""``python -m loralab.runners.c4 [train|pretokenize|table] ...`` (``train`` is the default).

Example:
    $ torchrun --nproc-per-node 2 -m loralab.runners.c4 --model_config llama_60m --optimizer golore_adamw \\
        --batch_size 128 --total_batch_size 512 --lr 1e-3 --rand_ratio 0.8 --output_dir runs/golore60m
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _pretokenize(argv: list[str]) -> None:
    from transformers import AutoTokenizer

    from loralab.runners.c4.data import HubSource, LocalSource, find_shards, pretokenize

    p = argparse.ArgumentParser(
        prog="c4 pretokenize", description="Tokenize and pack C4 into .npy token shards."
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument("--tokenizer", default="t5-base")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--train_data", default=None, help="local shards (default: stream --dataset)")
    p.add_argument(
        "--eval_data",
        default=None,
        help="local validation shards (default: next to --train_data, else the hub)",
    )
    p.add_argument("--dataset", default="allenai/c4")
    p.add_argument("--dataset_config", default="en")
    p.add_argument("--text_field", default="text")
    p.add_argument("--shuffle_seed", type=int, default=42)
    p.add_argument("--max_train_sequences", type=int, default=None)
    p.add_argument("--max_eval_sequences", type=int, default=None)
    p.add_argument("--sequences_per_shard", type=int, default=100_000)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    for split, data, n, seed in (
        ("train", a.train_data, a.max_train_sequences, a.shuffle_seed),
        ("validation", a.eval_data or a.train_data, a.max_eval_sequences, None),
    ):
        source: LocalSource | HubSource
        if data is not None:
            try:
                source = LocalSource(
                    find_shards(data, split), text_field=a.text_field, shuffle_seed=seed
                )
            except FileNotFoundError:
                if split == "train":
                    raise
                logging.warning("no local %s shards at %s: skipping that split", split, data)
                continue
        else:
            source = HubSource(
                a.dataset, a.dataset_config, split, text_field=a.text_field, shuffle_seed=seed
            )
        pretokenize(
            source,
            tok,
            a.output_dir,
            split=split,
            max_length=a.max_length,
            max_sequences=n,
            sequences_per_shard=a.sequences_per_shard,
        )


def _table(argv: list[str]) -> None:
    from loralab.runners.c4.report import write_results

    p = argparse.ArgumentParser(
        prog="c4 table",
        description="Markdown table of final perplexity, tokens/s and memory per run.",
    )
    p.add_argument("runs_dir")
    print(write_results(p.parse_args(argv).runs_dir))


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``train`` (default), ``pretokenize`` or ``table``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "train"
    if argv and argv[0] == command:
        argv = argv[1:]
    if command == "pretokenize":
        _pretokenize(argv)
    elif command == "table":
        _table(argv)
    elif command == "train":
        from loralab.runners.c4.args import parse_args
        from loralab.runners.c4.train import run

        run(parse_args(argv))
    else:
        raise SystemExit(f"unknown command {command!r}: use train, pretokenize or table")
