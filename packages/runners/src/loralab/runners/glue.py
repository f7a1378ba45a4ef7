"""GLUE fine-tuning: ``python -m loralab.runners.glue --task_name sst2 --method lora-ga ...``.

RoBERTa / BERT / T5 (any ``AutoModelForSequenceClassification``) on a GLUE task from
``datasets.load_dataset("nyu-mll/glue", task)`` or local csv/tsv/json/jsonl files with the same
columns; the task's official metric (accuracy, F1, Matthews correlation, Pearson/Spearman) computed
here with numpy (no metric download). The final evaluation's logits of every validation example are
in ``output_dir/eval_predictions.jsonl`` (``idx``, ``label``, ``logits``); ``final/`` is the method's
export (``PeftModel.from_pretrained(base, final)`` or ``AutoModelForSequenceClassification.from_pretrained(final)``
reproduces those logits).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralab.runners.arguments import TrainArgs, _f, parse_args
from loralab.runners.data import (
    dtype_kwargs,
    load_pretrained,
    load_split,
    pad_collate,
    require_columns,
    take,
)
from loralab.runners.loop import to_device
from loralab.runners.loop.finetune import (
    TrainResult,
    check_output_dir,
    engine_before_loading,
    finetune,
    loads_on_meta,
)
from loralab.runners.predictions import write_predictions
from loralab.runners.preflight import check_train_args
from loralab.runners.quantization import bnb_config, prepare_quantized_model, quantized_load_kwargs

__all__ = [
    "GLUE_TASKS",
    "PREDICTIONS_FILE",
    "GlueArgs",
    "encode_glue",
    "glue_metrics",
    "load_seq_cls_model",
    "main",
    "matthews_corrcoef",
    "pearson",
    "spearman",
]

logger = logging.getLogger(__name__)

GLUE_TASKS: dict[str, tuple[str, str | None, int, str]] = {
    # task: (text column, second text column, num_labels, validation split)
    "cola": ("sentence", None, 2, "validation"),
    "sst2": ("sentence", None, 2, "validation"),
    "mrpc": ("sentence1", "sentence2", 2, "validation"),
    "qqp": ("question1", "question2", 2, "validation"),
    "stsb": ("sentence1", "sentence2", 1, "validation"),
    "mnli": ("premise", "hypothesis", 3, "validation_matched"),
    "qnli": ("question", "sentence", 2, "validation"),
    "rte": ("sentence1", "sentence2", 2, "validation"),
    "wnli": ("sentence1", "sentence2", 2, "validation"),
}
PREDICTIONS_FILE = "eval_predictions.jsonl"
"""One row per validation example of the final evaluation: ``idx``, ``label``, ``logits`` (list of floats)."""
HEAD_NAMES = ("classifier", "score", "classification_head")
EOS_POOLED = ("t5", "mt5", "umt5", "bart", "mbart")
"""Model types whose sequence-classification head reads the hidden state at the ``</s>`` token (the
model raises on an example without one): examples whose tokenizer added none get one appended."""


@dataclass
class GlueArgs(TrainArgs):
    task_name: str = _f(None, "GLUE task", choices=tuple(GLUE_TASKS))
    dataset_name: str = _f("nyu-mll/glue", "hub dataset (config = task name)")
    train_file: str | None = _f(
        None, "local training file (csv/tsv/json/jsonl/parquet) with the task's columns and 'label'"
    )
    validation_file: str | None = _f(None, "local validation file, same columns", identity=False)
    max_length: int = _f(128, "maximum tokens per (pair of) sentence(s)")

    def validate(self) -> None:
        super().validate()
        if self.task_name not in GLUE_TASKS:
            raise ValueError(
                f"--task_name must be one of {', '.join(GLUE_TASKS)}, got {self.task_name!r}"
            )


def matthews_corrcoef(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Binary/multiclass Matthews correlation (CoLA's metric), as sklearn computes it."""
    labels = np.union1d(y_true, y_pred)
    c = np.zeros((len(labels), len(labels)))
    idx = {v: i for i, v in enumerate(labels)}
    for t, p in zip(y_true, y_pred):
        c[idx[t], idx[p]] += 1
    t_sum, p_sum = c.sum(1), c.sum(0)
    n, correct = c.sum(), np.trace(c)
    cov_ytyp = correct * n - t_sum @ p_sum
    cov_ypyp = n * n - p_sum @ p_sum
    cov_ytyt = n * n - t_sum @ t_sum
    denom = np.sqrt(cov_ytyt * cov_ypyp)
    return float(cov_ytyp / denom) if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float) - np.mean(x), np.asarray(y, float) - np.mean(y)
    d = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / d) if d else 0.0


def _rank(a: np.ndarray) -> np.ndarray:
    # average ranks of ties, as scipy.stats.rankdata(method="average")
    a = np.asarray(a, float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    sa = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sa[j + 1] == sa[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_rank(x), _rank(y))


def glue_metrics(task: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The GLUE metric(s) of ``task`` (predictions are class ids, or scores for STS-B)."""
    if task == "stsb":
        return {"pearson": pearson(preds, labels), "spearmanr": spearman(preds, labels)}
    if task == "cola":
        return {"matthews_correlation": matthews_corrcoef(labels, preds)}
    out = {"accuracy": float((preds == labels).mean())}
    if task in ("mrpc", "qqp"):
        tp = float(((preds == 1) & (labels == 1)).sum())
        fp = float(((preds == 1) & (labels == 0)).sum())
        fn = float(((preds == 0) & (labels == 1)).sum())
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out


def encode_glue(
    ds: Any, tokenizer: Any, args: GlueArgs, source: str, *, eos_id: int | None = None
) -> tuple[list[dict[str, Any]], list[int]]:
    """Tokenized ``{"input_ids", "labels"}`` rows of the labeled examples and their ``idx`` (the
    dataset's ``idx`` column, else the row number); with ``eos_id``, every row ends in that token
    (T5/BART heads)."""
    first, second, num_labels, _ = GLUE_TASKS[args.task_name]
    require_columns(ds, [first, "label"] + ([second] if second else []), source)
    out, idxs = [], []
    for row, ex in enumerate(ds):
        if ex["label"] is None or (num_labels > 1 and int(ex["label"]) < 0):
            continue  # unlabeled (test-split) rows
        texts = (ex[first],) if second is None else (ex[first], ex[second])
        ids = tokenizer(*texts, truncation=True, max_length=args.max_length)["input_ids"]
        if eos_id is not None and eos_id not in ids:
            ids = [*ids[: args.max_length - 1], eos_id]
        label = float(ex["label"]) if num_labels == 1 else int(ex["label"])
        out.append({"input_ids": ids, "labels": label})
        idxs.append(int(ex["idx"]) if ex.get("idx") is not None else row)
    if not out:
        raise ValueError(f"{source}: no labeled example")
    return out, idxs


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_seq_cls_model(
    path: str,
    num_labels: int,
    seed: int,
    *,
    tokenizer: Any = None,
    quantization_config: Any = None,
    gradient_checkpointing: bool = False,
    on_meta: bool = False,
) -> tuple[Any, Any, list[str]]:
    """``(model, tokenizer, head names)``: an fp32 ``AutoModelForSequenceClassification`` of ``path``.

    The new head is initialized under ``torch.manual_seed(seed)`` (every run from the same seed
    starts from the same head). ``on_meta``: built on the meta device, no weight read (the ranks but
    the first under FSDP2's rank-0 loading, :func:`loralab.runners.data.load_pretrained`).
    ``tokenizer`` defaults to ``path``'s; a missing pad token becomes eos,
    and the model's ``pad_token_id`` follows the tokenizer's when the config has none. The head
    names (``classifier`` / ``score`` / ``classification_head``) are what ``modules_to_save`` needs.

    ``quantization_config`` (a ``BitsAndBytesConfig``, :func:`loralab.runners.quantization.bnb_config`)
    loads a quantized base (the head stays float) prepared for k-bit training
    (:func:`loralab.runners.quantization.prepare_quantized_model`).
    """
    from transformers import AutoModelForSequenceClassification

    if tokenizer is None:
        tokenizer = _load_tokenizer(path)
    torch.manual_seed(seed)
    # fp32 whatever the checkpoint's stored dtype (see dtype_kwargs)
    model = load_pretrained(
        AutoModelForSequenceClassification,
        path,
        on_meta=on_meta,
        num_labels=num_labels,
        **dtype_kwargs(torch.float32),
        **quantized_load_kwargs(quantization_config),
    )
    model = prepare_quantized_model(model, gradient_checkpointing=gradient_checkpointing)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    heads = sorted(
        {n.split(".")[-1] for n, _ in model.named_modules() if n.split(".")[-1] in HEAD_NAMES}
    )
    return model, tokenizer, heads


def run(args: GlueArgs) -> TrainResult:
    """Load, fine-tune and evaluate; returns the final metrics (also in ``output_dir/metrics.jsonl``)."""
    from transformers import AutoConfig

    check_output_dir(args)  # before anything loads
    _, _, num_labels, val_split = GLUE_TASKS[args.task_name]

    # data
    tokenizer = _load_tokenizer(args.tokenizer_name or args.model_name_or_path)
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    eos_id = config.eos_token_id if config.model_type in EOS_POOLED else None
    train_src = (
        f"--train_file {args.train_file}"
        if args.train_file
        else f"{args.dataset_name}/{args.task_name} train"
    )
    val_src = (
        f"--validation_file {args.validation_file}"
        if args.validation_file
        else f"{args.dataset_name}/{args.task_name} {val_split}"
    )
    train_raw = take(
        load_split(args.dataset_name, args.task_name, "train", args.train_file, arg="--train_file"),
        args.max_train_samples,
    )
    val_raw = take(
        load_split(
            args.dataset_name,
            args.task_name,
            val_split,
            args.validation_file,
            arg="--validation_file",
        ),
        args.max_eval_samples,
    )
    train_set, _ = encode_glue(train_raw, tokenizer, args, train_src, eos_id=eos_id)
    val_set, val_idx = encode_glue(val_raw, tokenizer, args, val_src, eos_id=eos_id)
    collate = pad_collate(tokenizer.pad_token_id)

    # model (the method wraps it inside finetune)
    # accelerate's ZeRO-3 with zero3_init_flag: the Accelerator before the model, which then loads
    # partitioned (deepspeed.zero.Init)
    engine = engine_before_loading(args)
    model, _, heads = load_seq_cls_model(
        args.model_name_or_path,
        num_labels,
        args.seed,
        tokenizer=tokenizer,
        # the new head stays float (it trains as modules_to_save)
        quantization_config=bnb_config(args, skip_modules=list(HEAD_NAMES)),
        gradient_checkpointing=args.gradient_checkpointing,
        on_meta=loads_on_meta(args),  # fsdp_cpu_ram_efficient_loading: the weights on rank 0 only
    )
    args.task_type = "SEQ_CLS"
    args.modules_to_save = heads or None

    def evaluate(engine: Any, model: torch.nn.Module) -> dict[str, float]:
        # each rank scores its shard; every row's logits go to eval_predictions.jsonl
        shard = list(range(engine.rank, len(val_set), engine.world_size))
        real = len(shard)
        if engine.gathers_in_forward and engine.world_size > 1:
            # ZeRO-3 / FSDP2 gather parameters inside every forward: every rank runs as many forwards,
            # the shorter shards padded with a repeated example whose logits are dropped
            per_rank = -(-len(val_set) // engine.world_size)
            shard += [shard[-1] if shard else 0] * (per_rank - len(shard))
        bs = args.per_device_eval_batch_size
        rows = []
        for i in range(0, len(shard), bs):
            ids = shard[i : i + bs]
            batch = to_device(collate([val_set[j] for j in ids]), engine.device)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
            rows += [(j, row) for j, row in zip(ids, logits.cpu().tolist())]
        rows = rows[:real]
        by_index = dict(engine.gather_object(rows))
        logits = np.array([by_index[j] for j in range(len(val_set))])
        labels = np.array([ex["labels"] for ex in val_set])
        preds = logits[:, 0] if num_labels == 1 else logits.argmax(-1)
        if engine.is_main:
            write_predictions(
                Path(args.output_dir) / PREDICTIONS_FILE,
                [
                    {"idx": val_idx[j], "label": val_set[j]["labels"], "logits": by_index[j]}
                    for j in range(len(val_set))
                ],
            )
        return {**glue_metrics(args.task_name, preds, labels), "num_examples": float(len(labels))}

    return finetune(args, model, train_set, collate, evaluate, tokenizer=tokenizer, engine=engine)


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(GlueArgs, argv, description=__doc__ or "")
    # bad input refused before any model or data loads
    check_train_args(args, auto_class="AutoModelForSequenceClassification", heads=HEAD_NAMES)
    return run(args).metrics


if __name__ == "__main__":
    from loralab.runners.cli import run_entrypoint

    sys.exit(run_entrypoint(main, sys.argv[1:], prog="python -m loralab.runners.glue"))
