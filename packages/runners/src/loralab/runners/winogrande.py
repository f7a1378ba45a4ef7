"""WinoGrande: train a causal LM and evaluate it by scoring the two completions.

``python -m loralab.runners.winogrande --model_name_or_path ... --method lora ...`` (also
``loralab winogrande ...``). Data: ``datasets.load_dataset("allenai/winogrande", "winogrande_xl")``
(columns ``sentence`` with one ``_``, ``option1``, ``option2``, ``answer`` = "1"/"2") or local files.

Scoring (the "partial evaluation" of Trinh & Le 2018, as lm-evaluation-harness does it): for each
option, the context is the sentence up to the blank with the option substituted, the continuation is
the rest of the sentence; the option whose context gives the continuation the higher total
log-probability wins. Both options share the continuation tokens, so the sums compare like for like.
Training uses the same split: the sentence with the correct option, loss on the continuation only.

Example:
    >>> split_sentence("The trophy didn't fit in the suitcase because the _ was too big.", "trophy")
    ("The trophy didn't fit in the suitcase because the trophy", ' was too big.')
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loralab.runners.arguments import TrainArgs, _f, parse_args
from loralab.runners.data import load_split, pad_collate, require_columns, take
from loralab.runners.loop.finetune import (
    TrainResult,
    check_output_dir,
    engine_before_loading,
    finetune,
)
from loralab.runners.predictions import write_predictions
from loralab.runners.preflight import check_train_args

__all__ = [
    "WINOGRANDE_CONFIGS",
    "WinoGrandeArgs",
    "encode_continuation",
    "main",
    "run",
    "score_options",
    "split_sentence",
]

logger = logging.getLogger(__name__)

WINOGRANDE_CONFIGS = (
    "winogrande_xs",
    "winogrande_s",
    "winogrande_m",
    "winogrande_l",
    "winogrande_xl",
    "winogrande_debiased",
)
PREDICTIONS_FILE = "winogrande_predictions.jsonl"
COLUMNS = ("sentence", "option1", "option2", "answer")


@dataclass
class WinoGrandeArgs(TrainArgs):
    dataset_name: str = _f("allenai/winogrande", "hub dataset")
    dataset_config: str = _f("winogrande_xl", "training-set size", choices=WINOGRANDE_CONFIGS)
    train_file: str | None = _f(
        None, "local WinoGrande-format file (sentence with '_', option1, option2, answer '1'/'2')"
    )
    validation_file: str | None = _f(
        None, "local WinoGrande-format evaluation file", identity=False
    )
    max_length: int = _f(128, "maximum tokens per sentence (context + continuation)")
    torch_dtype: str = _f("float32", "weights' dtype when loading", choices=("float32", "bfloat16"))


def split_sentence(sentence: str, option: str) -> tuple[str, str]:
    """``(context, continuation)``: the sentence up to ``_`` with ``option`` substituted, and the rest."""
    if sentence.count("_") != 1:
        raise ValueError(f"a WinoGrande sentence has exactly one '_' blank, got {sentence!r}")
    idx = sentence.index("_")
    continuation = sentence[idx + 1 :]
    if not continuation.strip():
        raise ValueError(f"nothing follows the blank to score in {sentence!r}")
    return sentence[:idx] + option, continuation


def encode_continuation(
    tokenizer: Any, context: str, continuation: str, max_length: int
) -> dict[str, list[int]]:
    """Context tokens + continuation tokens; labels -100 on the context. Over ``max_length`` the context
    is cut from the left (the continuation, which is scored, is kept whole)."""
    c = tokenizer(context)["input_ids"]
    r = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if len(r) >= max_length:
        raise ValueError(
            f"the continuation {continuation!r} alone has {len(r)} >= --max_length {max_length} tokens"
        )
    c = c[max(0, len(c) + len(r) - max_length) :]
    return {"input_ids": c + r, "labels": [-100] * len(c) + r}


def _examples(ds: Any, source: str) -> list[dict[str, Any]]:
    require_columns(ds, COLUMNS, source)
    out = []
    for ex in ds:
        answer = str(ex["answer"]).strip()
        if answer not in ("1", "2"):
            continue  # the test split is unlabeled (answer "")
        out.append(
            {
                "sentence": ex["sentence"],
                "options": (ex["option1"], ex["option2"]),
                "label": int(answer) - 1,
            }
        )
    if not out:
        raise ValueError(f"{source}: no labeled example (answer must be '1' or '2')")
    return out


@torch.no_grad()
def score_options(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_length: int = 128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[len(examples), 2]`` total log-probabilities of each option's continuation (float32, CPU).

    Each example is ``{"sentence": ..., "options": (option1, option2)}``; ``batch_size`` examples (so
    ``2 * batch_size`` sequences, right-padded with their attention mask) per forward.
    """
    device = device or next(model.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    collate = pad_collate(pad_id)
    seqs = [
        encode_continuation(tokenizer, *split_sentence(ex["sentence"], opt), max_length)
        for ex in examples
        for opt in ex["options"]
    ]
    scores = []
    was_training = model.training
    model.eval()
    for i in range(0, len(seqs), 2 * batch_size):
        batch = collate(seqs[i : i + 2 * batch_size])
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch["labels"][:, 1:].to(device)
        mask = target != -100
        tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.append((tok * mask).sum(-1).cpu())
    model.train(was_training)
    return torch.cat(scores).view(-1, 2) if scores else torch.zeros(0, 2)


def run(args: WinoGrandeArgs) -> TrainResult:
    """Fine-tune on the WinoGrande training set and report two-option accuracy on the validation set."""
    from loralab.runners.metamath import load_run_model

    check_output_dir(args)  # before anything loads
    # accelerate's ZeRO-3 with zero3_init_flag: the Accelerator before the model (loaded partitioned)
    engine = engine_before_loading(args)
    model, tokenizer = load_run_model(args)
    train_src = (
        f"--train_file {args.train_file}"
        if args.train_file
        else f"{args.dataset_name}/{args.dataset_config} train"
    )
    val_src = (
        f"--validation_file {args.validation_file}"
        if args.validation_file
        else f"{args.dataset_name}/{args.dataset_config} validation"
    )
    train_raw = take(
        load_split(
            args.dataset_name, args.dataset_config, "train", args.train_file, arg="--train_file"
        ),
        args.max_train_samples,
    )
    val_raw = take(
        load_split(
            args.dataset_name,
            args.dataset_config,
            "validation",
            args.validation_file,
            arg="--validation_file",
        ),
        args.max_eval_samples,
    )
    train_ex, val_ex = _examples(train_raw, train_src), _examples(val_raw, val_src)
    train_set = [
        encode_continuation(
            tokenizer, *split_sentence(ex["sentence"], ex["options"][ex["label"]]), args.max_length
        )
        for ex in train_ex
    ]
    predictions_path = Path(args.output_dir) / PREDICTIONS_FILE

    def evaluate(engine: Any, model: torch.nn.Module) -> dict[str, float]:
        shard = list(range(engine.rank, len(val_ex), engine.world_size))
        real = len(shard)
        if engine.gathers_in_forward and engine.world_size > 1:
            # ZeRO-3 / FSDP2 gather parameters inside every forward: every rank scores as many
            # examples, the shorter shards padded with a repeated one whose scores are dropped
            per_rank = -(-len(val_ex) // engine.world_size)
            shard += [shard[-1] if shard else 0] * (per_rank - len(shard))
        scores = score_options(
            model,
            tokenizer,
            [val_ex[i] for i in shard],
            batch_size=args.per_device_eval_batch_size,
            max_length=args.max_length,
            device=engine.device,
        )[:real]
        shard = shard[:real]
        by_index = dict(engine.gather_object([(i, s) for i, s in zip(shard, scores.tolist())]))
        records = []
        for i, ex in enumerate(val_ex):
            s = by_index[i]
            pred = int(s[1] > s[0])
            records.append(
                {
                    "idx": i,
                    "sentence": ex["sentence"],
                    "options": list(ex["options"]),
                    "scores": s,
                    "prediction": pred + 1,
                    "answer": ex["label"] + 1,
                    "correct": pred == ex["label"],
                }
            )
        if engine.is_main:
            write_predictions(predictions_path, records)
        return {
            "accuracy": sum(r["correct"] for r in records) / len(records),
            "num_examples": float(len(records)),
        }

    args.task_type = "CAUSAL_LM"
    collate = pad_collate(tokenizer.pad_token_id)
    return finetune(args, model, train_set, collate, evaluate, tokenizer=tokenizer, engine=engine)


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(WinoGrandeArgs, argv, description=__doc__ or "")
    check_train_args(args)  # bad input refused before any model or data loads
    return run(args).metrics


if __name__ == "__main__":
    from loralab.runners.cli import run_entrypoint

    sys.exit(run_entrypoint(main, sys.argv[1:], prog="python -m loralab.runners.winogrande"))
