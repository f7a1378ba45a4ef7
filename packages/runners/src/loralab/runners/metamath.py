"""MetaMathQA fine-tuning of a causal LM, then GSM8K evaluation by greedy generation.

``python -m loralab.runners.metamath --model_name_or_path meta-llama/Llama-2-7b-hf --method lora-ga ...``
(also ``loralab metamath ...``). Training data: ``datasets.load_dataset("meta-math/MetaMathQA")``
(columns ``query``, ``response``) or ``--train_file``; evaluation: ``openai/gsm8k`` ``main`` test split
(``question``, ``answer`` ending in ``#### X``) or ``--eval_file``.

Each example is ``prompt(query) + response + eos``; the loss is on the response and eos tokens only
(the prompt's labels are -100). The prompt is tokenized on its own, exactly as at evaluation, and the
response's tokens are appended, so the model is trained on the token sequence it will continue.
Examples longer than ``--max_length`` are cut from the right; one whose prompt alone fills
``--max_length`` is dropped (and counted in the log).

Evaluation (:mod:`loralab.runners.gsm8k`): batched greedy generation with left padding and the
attention mask, answer extraction, accuracy, and every prediction in ``output_dir/gsm8k_predictions.jsonl``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from loralab.runners.example_flags import lorafa_example_argv
from loralab.runners.gsm8k import (
    PROMPT_TEMPLATES,
    format_prompt,
    generate_batched,
    gsm8k_accuracy,
    write_predictions,
)
from loralab.runners.loop.checkpoint import remove_run_artifacts
from loralab.runners.loop.engine import AccelerateEngine
from loralab.runners.loop.finetune import (
    TrainResult,
    build_engine,
    check_output_dir,
    engine_before_loading,
    finetune,
    loads_on_meta,
)
from loralab.runners.loop.metrics import MetricsLog
from loralab.runners.preflight import check_train_args
from loralab.runners.quantization import bnb_config, prepare_quantized_model, quantized_load_kwargs

__all__ = [
    "MetaMathArgs",
    "encode_sft",
    "evaluate_gsm8k",
    "load_causal_lm",
    "load_run_model",
    "main",
    "run",
]

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "gsm8k_predictions.jsonl"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class MetaMathArgs(TrainArgs):
    dataset_name: str = _f("meta-math/MetaMathQA", "hub training set (columns query, response)")
    train_file: str | None = _f(
        None,
        "local MetaMathQA-format file (json array / jsonl / csv / parquet with query, response)",
    )
    eval_dataset_name: str = _f(
        "openai/gsm8k",
        "hub evaluation set (config 'main', split 'test'; columns question, answer)",
        identity=False,
    )
    eval_file: str | None = _f(
        None, "local GSM8K-format file (question, answer ending in '#### X')", identity=False
    )
    query_types: str | None = _f(
        None,
        "keep only MetaMathQA rows whose 'type' starts with one of these comma-separated prefixes (e.g. GSM)",
    )
    prompt_template: str = _f(
        "alpaca",
        f"prompt: {' or '.join(PROMPT_TEMPLATES)} (LoRA-GA seed's 'Q: ..\\nA: '), or a format string with {{query}}",
    )
    max_length: int = _f(512, "maximum tokens per training example (prompt + response + eos)")
    max_new_tokens: int = _f(256, "GSM8K generation length", identity=False)
    torch_dtype: str = _f(
        "float32",
        "weights' dtype when loading (bfloat16 halves memory; --bf16 alone keeps fp32 master weights)",
        choices=tuple(TORCH_DTYPES),
    )
    do_train: bool = _f(
        True, "fine-tune before evaluating (false: only evaluate --model_name_or_path)"
    )

    def validate(self) -> None:
        super().validate()
        format_prompt(self.prompt_template, "q")  # raises naming --prompt_template
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.merge_and_save and not self.do_train:
            raise ValueError("--merge_and_save needs training (--do_train true): nothing to merge")
        if self.fsdp and not self.do_train:
            from loralab.runners.launch import fsdp_flag

            raise ValueError(
                f"{fsdp_flag(self.fsdp)} shards training; --do_train false evaluates without it: drop it"
            )


def load_causal_lm(
    path: str,
    tokenizer_name: str | None = None,
    torch_dtype: str = "float32",
    *,
    quantization_config: Any = None,
    gradient_checkpointing: bool = False,
    on_meta: bool = False,
) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` and its tokenizer; a missing pad token becomes eos (generation pads left).

    ``quantization_config`` (a ``BitsAndBytesConfig``, :func:`loralab.runners.quantization.bnb_config`)
    loads a quantized base prepared for k-bit training
    (:func:`loralab.runners.quantization.prepare_quantized_model`). ``on_meta``: built on the meta
    device, no weight read (FSDP2's rank-0 loading, :func:`loralab.runners.data.load_pretrained`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_pretrained(
        AutoModelForCausalLM,
        path,
        on_meta=on_meta,
        **dtype_kwargs(TORCH_DTYPES[torch_dtype]),
        **quantized_load_kwargs(quantization_config),
    )
    model = prepare_quantized_model(model, gradient_checkpointing=gradient_checkpointing)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def encode_sft(
    tokenizer: Any, prompt: str, response: str, max_length: int
) -> dict[str, list[int]] | None:
    """``input_ids`` = prompt tokens + response tokens + eos; ``labels`` = -100 on the prompt.

    ``None`` when the prompt alone fills ``max_length`` (no response token would be trained).

    Example:
        >>> from loralab.core.testing import offline_tokenizer
        >>> ex = encode_sft(offline_tokenizer(), "Q: 1+1?\\nA: ", "2", 64)
        >>> ex["labels"][-2:] == ex["input_ids"][-2:] and ex["labels"][0] == -100
        True
    """
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) >= max_length:
        return None
    ids = (p + r)[:max_length]
    labels = ([-100] * len(p) + r)[:max_length]
    return {"input_ids": ids, "labels": labels}


def _load_train(args: MetaMathArgs, tokenizer: Any) -> list[dict[str, list[int]]]:
    source = f"--train_file {args.train_file}" if args.train_file else f"{args.dataset_name} train"
    raw = load_split(args.dataset_name, None, "train", args.train_file, arg="--train_file")
    require_columns(raw, ["query", "response"], source)
    if args.query_types:
        prefixes = tuple(t.strip() for t in args.query_types.split(",") if t.strip())
        require_columns(raw, ["type"], f"{source} (--query_types)")
        raw = raw.filter(lambda ex: str(ex["type"]).startswith(prefixes))
        if len(raw) == 0:
            raise ValueError(
                f"--query_types {args.query_types}: no row of {source} has such a 'type'"
            )
    raw = take(raw, args.max_train_samples)
    out, dropped = [], 0
    for ex in raw:
        enc = encode_sft(
            tokenizer,
            format_prompt(args.prompt_template, ex["query"]),
            ex["response"],
            args.max_length,
        )
        if enc is None:
            dropped += 1
        else:
            out.append(enc)
    if dropped:
        logger.warning(
            "%d of %d training examples dropped: their prompt alone has >= --max_length %d tokens",
            dropped,
            len(raw),
            args.max_length,
        )
    if not out:
        raise ValueError(f"{source}: no training example fits --max_length {args.max_length}")
    return out


def _load_eval(args: MetaMathArgs) -> tuple[list[str], list[str]]:
    source = (
        f"--eval_file {args.eval_file}" if args.eval_file else f"{args.eval_dataset_name} main test"
    )
    raw = take(
        load_split(args.eval_dataset_name, "main", "test", args.eval_file, arg="--eval_file"),
        args.max_eval_samples,
    )
    require_columns(raw, ["question", "answer"], source)
    return list(raw["question"]), list(raw["answer"])


def evaluate_gsm8k(
    engine: Any,
    model: Any,
    tokenizer: Any,
    questions: list[str],
    answers: list[str],
    *,
    prompt_template: str = "alpaca",
    batch_size: int = 8,
    max_new_tokens: int = 256,
    predictions_path: str | Path | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """GSM8K accuracy of ``model`` (each rank of ``engine`` generates its shard; the main process writes
    the JSONL, one row per question with its ``idx``)."""
    synced = engine.gathers_in_forward and engine.world_size > 1
    shard = list(range(engine.rank, len(questions), engine.world_size))
    prompts = [format_prompt(prompt_template, questions[i]) for i in shard]
    if synced:
        # ZeRO-3 gathers parameters inside every forward: all ranks must run the same number of
        # generate() calls, so shorter shards are padded with a repeated prompt (its output dropped)
        per_rank = -(-len(questions) // engine.world_size)
        prompts += [prompts[-1] if prompts else format_prompt(prompt_template, questions[0])] * (
            per_rank - len(prompts)
        )
    completions = generate_batched(
        engine.unwrap(model),
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=engine.device,
        synced_gpus=synced,
        progress=progress,
    )
    by_index = dict(engine.gather_object(list(zip(shard, completions[: len(shard)]))))
    ordered = [by_index[i] for i in range(len(questions))]
    accuracy, records = gsm8k_accuracy(questions, answers, ordered)
    if engine.is_main and predictions_path is not None:
        write_predictions(predictions_path, records)
    return {
        "accuracy": accuracy,
        "num_examples": float(len(records)),
        "num_answered": float(sum(r["prediction"] is not None for r in records)),
    }


def load_run_model(args: Any) -> tuple[Any, Any]:
    """:func:`load_causal_lm` with a run's flags (``--model_name_or_path``, ``--tokenizer_name``,
    ``--torch_dtype``, the quantization flags, ``--gradient_checkpointing``). Under accelerate's
    ``fsdp_cpu_ram_efficient_loading`` only rank 0 loads the weights (:func:`loads_on_meta`)."""
    return load_causal_lm(
        args.model_name_or_path,
        args.tokenizer_name,
        args.torch_dtype,
        quantization_config=bnb_config(args),
        gradient_checkpointing=args.gradient_checkpointing,
        on_meta=loads_on_meta(args),
    )


def run(args: MetaMathArgs) -> TrainResult | dict[str, float]:
    """Fine-tune on MetaMathQA (unless ``--do_train false``) and evaluate on GSM8K."""
    check_output_dir(args)  # before anything loads
    # accelerate's ZeRO-3 with zero3_init_flag: the Accelerator before the model (loaded partitioned)
    engine = engine_before_loading(args) if args.do_train else None
    model, tokenizer = load_run_model(args)
    questions, answers = _load_eval(args)
    predictions_path = Path(args.output_dir) / PREDICTIONS_FILE

    def evaluate(engine: Any, model: torch.nn.Module) -> dict[str, float]:
        return evaluate_gsm8k(
            engine,
            model,
            tokenizer,
            questions,
            answers,
            prompt_template=args.prompt_template,
            batch_size=args.per_device_eval_batch_size,
            max_new_tokens=args.max_new_tokens,
            predictions_path=predictions_path,
            progress=not args.disable_tqdm and engine.is_main,
        )

    if not args.do_train:
        return _evaluate_only(args, model, evaluate)
    train_set = _load_train(args, tokenizer)
    args.task_type = "CAUSAL_LM"
    collate = pad_collate(tokenizer.pad_token_id)
    return finetune(args, model, train_set, collate, evaluate, tokenizer=tokenizer, engine=engine)


def _evaluate_only(args: TrainArgs, model: Any, evaluate: Any) -> dict[str, float]:
    """``--do_train false``: evaluate ``--model_name_or_path`` as it is (a ``summary`` record at step 0)."""
    engine = build_engine(args)
    assert isinstance(engine, AccelerateEngine)  # --fsdp is refused without training (validate)
    out = Path(args.output_dir)
    engine.barrier()  # every rank checked --output_dir before the main process writes (see finetune)
    if engine.is_main:
        if args.overwrite_output_dir:
            remove_run_artifacts(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(args.to_json())
        print(f"[loralab.runners] config:\n{args.to_json()}", flush=True)
    acc = engine.acc
    model = (
        acc.prepare_model(model, evaluation_mode=True)
        if not engine.deepspeed
        else model.to(engine.device)
    )
    model.eval()
    with torch.no_grad():
        metrics = evaluate(engine, model)
    MetricsLog(out / "metrics.jsonl", enabled=engine.is_main).summary(0, metrics, status="ok")
    if engine.is_main:
        print(f"[loralab.runners] eval: {metrics}", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # PEFT's LoRA-FA example flags (--base_model_name_or_path, --dataset_name_or_path, --lorafa, --quantize)
    argv = lorafa_example_argv(sys.argv[1:] if argv is None else list(argv))
    args = parse_args(MetaMathArgs, argv, description=__doc__ or "")
    check_train_args(args)  # bad input refused before any model or data loads
    result = run(args)
    return result if isinstance(result, dict) else result.metrics


if __name__ == "__main__":
    from loralab.runners.cli import run_entrypoint

    sys.exit(run_entrypoint(main, sys.argv[1:], prog="python -m loralab.runners.metamath"))
