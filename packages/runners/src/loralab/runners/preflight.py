"""Pre-flight checks: refuse bad input before any model or data is loaded, naming the flag and the fix.

Every fine-tuning entrypoint (GLUE, MetaMath, WinoGrande) calls :func:`check_train_args` right after
parsing its arguments; ``loralab compare`` runs these checks and its own
(:mod:`loralab.runners.compare.checks`) before it starts any method process. What is checked (each failure is a :class:`PreflightError`, a ``ValueError``, or a
``FileNotFoundError`` for a missing file):

* ``--device`` (:func:`check_device`): ``cuda`` on a machine without CUDA, a GPU index that does not
  exist, a name torch does not know.
* the model (:func:`check_model_path`): a path-like argument (``/...``, ``./...``, ``~...``, or with more
  than one ``/``) that does not exist or holds no model, told apart from a hub id (``org/name``).
* local data files (:func:`check_data_file`): missing, empty, a non-UTF-8 byte, a broken JSON line, a
  csv row with more fields than its header, an unreadable parquet file: the file and line are named.
* ``--output_dir`` (:func:`check_output_dir_writable`): an existing file, or a place that cannot be written.
* ranks (:func:`check_ranks`): a LoRA rank (``2r`` for LoRA-GA) or GaLore/GoLore rank larger than
  ``min(out, in)`` of a target layer; the shapes come from the model's config on the ``meta`` device
  (no weight is read), the targets from :func:`loralab.core.find_targets`, as the methods select them.

Example:
    >>> from loralab.runners.preflight import check_device
    >>> check_device("gpu0")
    Traceback (most recent call last):
    ...
    loralab.runners.preflight.PreflightError: --device gpu0: not a device name...
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PreflightError",
    "RankRequest",
    "bad_input_named",
    "check_data_file",
    "check_device",
    "check_model_path",
    "check_output_dir_writable",
    "check_ranks",
    "check_train_args",
]

logger = logging.getLogger(__name__)


class PreflightError(ValueError):
    """A run's input is wrong; the message names the flag (and the file and line) and what to do."""


class PreflightFileNotFoundError(PreflightError, FileNotFoundError):
    """A file or directory named on the command line does not exist."""


@contextlib.contextmanager
def bad_input_named() -> Iterator[None]:
    """Re-raise a plain ``ValueError`` of argument validation (a config's ``__post_init__``: its
    message names the flag) as :class:`PreflightError`, which the entrypoints report without a
    traceback; ``ValueError`` subclasses (:class:`PreflightError`, ``MethodError``) pass unchanged."""
    try:
        yield
    except ValueError as exc:
        if type(exc) is ValueError:
            raise PreflightError(str(exc)) from exc
        raise


# ---------------------------------------------------------------------------------- device


def check_device(name: str, flag: str = "--device") -> None:
    """Refuse a device this machine does not have (``auto`` always passes).

    Example:
        >>> check_device("cpu")
    """
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise PreflightError(
            f"{flag} {name}: not a device name ({exc}); use cpu, cuda, cuda:N or auto"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch {torch.__version__} is built without CUDA"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)"
            )
            raise PreflightError(
                f"{flag} {name}: this machine has no CUDA device ({why}); use {flag} cpu or {flag} auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PreflightError(
                f"{flag} {name}: there are {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PreflightError(
            f"{flag} {name}: MPS is not available on this machine; use {flag} cpu or {flag} auto"
        )


# ----------------------------------------------------------------------------------- model

_HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")


def _path_like(value: str) -> bool:
    seps = {os.sep} | ({os.altsep} if os.altsep else set())
    return (
        value.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or value in (".", "..")
        or any(value.endswith(s) for s in seps)
        or not _HUB_ID.match(value)
    )


def check_model_path(value: str, flag: str = "--model_name_or_path") -> None:
    """Refuse a local model path that does not exist or holds no model; hub ids pass unchanged.

    A path-like value (``/``, ``./``, ``../``, ``~`` at the start, a trailing separator, or more than
    one ``/``) must be a directory with ``config.json`` (or a PEFT ``adapter_config.json``). An
    ``org/name`` value is a path when that directory exists, else a hub id.

    Example:
        >>> check_model_path("./no/such/model")
        Traceback (most recent call last):
        ...
        loralab.runners.preflight.PreflightFileNotFoundError: --model_name_or_path ./no/such/model: no such directory; give an existing model directory (config.json + weights) or a hub id such as 'FacebookAI/roberta-base'
    """
    path = Path(value).expanduser()
    if not path.exists():
        if _path_like(value):
            raise PreflightFileNotFoundError(
                f"{flag} {value}: no such directory; give an existing model directory "
                "(config.json + weights) or a hub id such as 'FacebookAI/roberta-base'"
            )
        return  # a hub id
    if not path.is_dir():
        raise PreflightError(
            f"{flag} {value}: is a file; give the model's directory (the one holding config.json)"
        )
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise PreflightError(
            f"{flag} {value}: the directory has no config.json, so it is not a saved model; give the "
            "directory save_pretrained() wrote (config.json + weights)"
        )


# ------------------------------------------------------------------------------ data files

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_checked: set[tuple[str, int, int]] = set()


WHOLE_JSON_LIMIT = 512 * 2**20
"""Largest ``.json`` array parsed whole by the check (bytes); a larger one is checked for UTF-8 only
and its JSON is left to ``datasets`` (a whole parse would hold the file in memory twice)."""


def _lines(path: Path, where: str) -> Iterator[tuple[int, str]]:
    """``(line number, text with its line end)`` of the UTF-8 file at ``path``, streamed; a non-UTF-8
    byte is named with its line and column."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark
            try:
                yield n, line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PreflightError(
                    f"{where}, line {n}: byte 0x{line[exc.start]:02x} at column {exc.start + 1} is "
                    "not UTF-8; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)"
                ) from None


def _check_json_lines(path: Path, where: str) -> int:
    rows = 0
    for n, text in _lines(path, where):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PreflightError(
                f"{where}, line {n}: not valid JSON ({exc.msg} at column {exc.colno}); each line must "
                'be one JSON object such as {"sentence": ..., "label": 0}: fix or delete the line'
            ) from None
        if not isinstance(obj, dict):
            raise PreflightError(
                f"{where}, line {n}: a JSON {type(obj).__name__} where one JSON object per line "
                '({"column": value, ...}) is expected'
            )
        rows += 1
    return rows


def _first_char(path: Path, where: str) -> str:
    for _, text in _lines(path, where):
        if text.strip():
            return text.strip()[0]
    return ""


def _check_json(path: Path, where: str) -> int:
    """A ``.json`` file: a JSON array of objects, or JSON lines (``datasets`` reads both)."""
    whole_ok = path.stat().st_size <= WHOLE_JSON_LIMIT
    if _first_char(path, where) != "[":
        try:
            return _check_json_lines(path, where)
        except PreflightError as line_error:
            if not whole_ok or "UTF-8" in str(line_error):
                raise
            try:  # one JSON object spread over several lines
                whole = json.loads(path.read_bytes().decode("utf-8-sig"))
            except json.JSONDecodeError:
                raise line_error from None
            return 1 if isinstance(whole, dict) and whole else 0
    if not whole_ok:
        return sum(1 for _ in _lines(path, where))  # UTF-8 checked; the JSON is left to datasets
    for _ in _lines(path, where):  # names the first non-UTF-8 line
        pass
    try:
        rows = json.loads(path.read_bytes().decode("utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise PreflightError(
            f"{where}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); the file "
            "must be a JSON array of objects or one JSON object per line"
        ) from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PreflightError(
                f"{where}: element {i} of the JSON array is a {type(row).__name__}, not an object "
                '({"column": value, ...})'
            )
    return len(rows)


def _check_csv(path: Path, where: str, delimiter: str) -> int:
    reader = csv.reader((text for _, text in _lines(path, where)), delimiter=delimiter)
    header: list[str] | None = None
    rows = 0
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = row
                continue
            if len(row) > len(header):
                raise PreflightError(
                    f"{where}, line {reader.line_num}: {len(row)} fields but the header has "
                    f"{len(header)} ({', '.join(header)}); quote fields that contain "
                    f"{'a tab' if delimiter == chr(9) else 'a comma'}"
                )
            rows += 1
    except csv.Error as exc:
        raise PreflightError(f"{where}, line {reader.line_num}: {exc}") from None
    if header is not None and rows == 0:
        raise PreflightError(
            f"{where}: has a header ({', '.join(header)}) but no example rows; check the file"
        )
    return rows


def check_data_file(path: str, flag: str) -> None:
    """Refuse a local data file that ``datasets`` could not load into at least one example.

    Checks the extension, that the file is not empty, that every line is UTF-8, that every JSON line
    (``.jsonl``, JSON-lines ``.json``) is one object, that a ``.json`` array parses, that no csv/tsv row
    has more fields than its header, and that a parquet file opens with rows. The first problem is
    named with ``flag``, the file and the line. A file already checked (same size and time) is skipped.

    Raises:
        FileNotFoundError: no such file (a :class:`PreflightFileNotFoundError`).
        PreflightError: anything else, with the line and what to do.
    """
    p = Path(path).expanduser()
    where = f"{flag} {path}"
    if not p.exists():
        raise PreflightFileNotFoundError(f"{where}: no such file")
    if p.is_dir():
        raise PreflightError(f"{where}: is a directory; give one {'/'.join(_FORMATS)} file")
    suffix = p.suffix.lower()
    if suffix not in _FORMATS:
        raise PreflightError(
            f"{where}: unsupported extension {p.suffix!r} (use {', '.join(_FORMATS)})"
        )
    stat = p.stat()
    key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _checked:
        return
    if stat.st_size == 0:
        raise PreflightError(
            f"{where}: the file is empty (0 bytes); it needs at least one example: check the path, "
            "or regenerate the file"
        )
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(p).metadata.num_rows
        except Exception as exc:  # pyarrow raises several kinds on a damaged file
            raise PreflightError(
                f"{where}: not a readable parquet file ({type(exc).__name__}: {exc}); re-export it "
                "(e.g. DataFrame.to_parquet) or give a jsonl/csv file"
            ) from None
    else:
        try:
            if suffix == ".jsonl":
                rows = _check_json_lines(p, where)
            elif suffix == ".json":
                rows = _check_json(p, where)
            else:
                rows = _check_csv(p, where, "\t" if suffix == ".tsv" else ",")
        except OSError as exc:
            raise PreflightError(f"{where}: cannot be read ({exc.strerror})") from None
    if rows == 0:
        raise PreflightError(
            f"{where}: the file has no example (only blank lines or an empty list); it needs at "
            "least one row"
        )
    _checked.add(key)


# ------------------------------------------------------------------------------ output dir


def check_output_dir_writable(value: str, flag: str = "--output_dir") -> None:
    """Refuse an ``output_dir`` that is an existing file or cannot be created / written.

    Nothing is created: writability is probed with a temporary file (removed at once) in the
    directory, or in its nearest existing parent when the directory does not exist yet.

    Example:
        >>> import tempfile
        >>> check_output_dir_writable(tempfile.gettempdir() + "/a-run-not-made-yet")
    """
    out = Path(value).expanduser()
    if out.exists() and not out.is_dir():
        raise PreflightError(
            f"{flag} {value}: is an existing file, not a directory; give a directory path "
            "(it is created when missing)"
        )
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise PreflightError(
            f"{flag} {value}: cannot be created because {probe} is a file; give a directory path"
        )
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise PreflightError(
            f"{flag} {value}: cannot write in {probe} ({exc}); choose a directory you can write to"
        ) from None


# ----------------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class RankRequest:
    """One method's rank to check against the target layers.

    ``option`` is ``lora_r`` or ``galore_rank``; ``factor`` 2 for LoRA-GA (it needs ``2r`` singular
    vectors); ``flag`` is how the message names where the value came from (``--lora_r 128``).
    """

    method: str
    option: str
    value: int
    target_modules: Any
    flag: str
    factor: int = 1


def rank_request(method: str, args: Any, flag: str | None = None) -> RankRequest | None:
    """The :class:`RankRequest` of ``method`` with its resolved options in ``args`` (``None``: no rank)."""
    from loralab.runners.methods import get_method

    defaults = get_method(method).defaults
    for option in ("lora_r", "galore_rank"):
        value = getattr(args, option, None)
        if option in defaults and isinstance(value, int):
            return RankRequest(
                method=method,
                option=option,
                value=value,
                target_modules=getattr(args, "target_modules", "all-linear"),
                flag=flag or f"--{option} {value}",
                factor=2 if method == "lora-ga" else 1,
            )
    return None


def _meta_model(model_path: str, auto_class: str) -> Any:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_path)
    with torch.device("meta"), _without_zero3_loading():
        return getattr(transformers, auto_class).from_config(config)


@contextlib.contextmanager
def _without_zero3_loading() -> Iterator[None]:
    """transformers builds every model under ``deepspeed.zero.Init`` (collectives on every rank)
    while a ZeRO-3 DeepSpeed config is registered with it process-wide; a shapes-only model on the
    meta device needs none of that (under it, two ranks once waited on each other forever)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    active = ref() if ref is not None else None
    if active is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(active)


def check_ranks(
    model_path: str,
    requests: Sequence[RankRequest | None],
    *,
    auto_class: str,
    heads: Sequence[str] = (),
) -> None:
    """Refuse a rank larger than ``min(out, in)`` (LoRA-GA: ``2r``) of a target layer.

    ``None`` requests (:func:`rank_request` of a method without a rank) are skipped.

    The model is built from its config on the ``meta`` device (shapes only, no weight read). When the
    config cannot be read here (a hub id not in the cache, custom code), the check is skipped with a
    warning: loading the model then reports the problem itself.
    """
    from loralab.core.targets import TargetNotFoundError, find_targets

    wanted = [r for r in requests if r is not None]
    if not wanted:
        return
    try:
        model = _meta_model(model_path, auto_class)
    except Exception as exc:  # any failure here is reported again, fully, by the real load
        logger.warning(
            "rank check skipped: cannot build %s from the config of %s on the meta device (%s: %s)",
            auto_class,
            model_path,
            type(exc).__name__,
            exc,
        )
        return
    # ``heads``: a task head (GLUE's classifier) is trained in full (modules_to_save), never adapted
    exclude = rf"(.*\.)?({'|'.join(heads)})(\..*)?" if heads else None
    for req in wanted:
        spec = req.target_modules
        if isinstance(spec, str) and spec != "all-linear" and "," in spec:
            spec = [s.strip() for s in spec.split(",") if s.strip()]
        try:
            targets = find_targets(model, spec, exclude_modules=exclude)
        except TargetNotFoundError:
            continue  # the method reports unmatched targets itself, with PEFT's semantics
        if not targets:
            continue
        narrow = min(targets.values(), key=lambda t: min(t.shape))
        largest = min(narrow.shape) // req.factor
        if req.value > largest:
            out_f, in_f = narrow.shape
            need = "2r" if req.factor == 2 else "r"
            raise PreflightError(
                f"{req.flag}: too large for target layer {narrow.name} ({out_f} x {in_f}) of "
                f"{model_path}: --method {req.method} needs {need} <= min(out, in) = {min(narrow.shape)}; "
                f"the largest valid {req.option} for these target layers is {largest} (or leave the "
                "narrow layers out with --target_modules)"
            )


# ------------------------------------------------------------------------------ entrypoints


def check_train_args(
    args: Any, *, auto_class: str = "AutoModelForCausalLM", heads: Sequence[str] = ()
) -> None:
    """Everything a fine-tuning entrypoint (GLUE, MetaMath, WinoGrande) can check before loading.

    ``args`` are the parsed, validated arguments (method options resolved); ``auto_class`` is the
    ``transformers`` class the entrypoint loads (for the target layers' names and shapes); ``heads``
    the names of its task head's modules, which are trained in full and never adapted.
    """
    if getattr(args, "fsdp", None):
        from loralab.runners.launch import fsdp_flag
        from loralab.runners.methods import get_method

        get_method(args.method).check_engine("fsdp2", fsdp_flag(args.fsdp))
    if getattr(args, "deepspeed", None):
        from loralab.runners.launch import load_deepspeed_config, zero_stage
        from loralab.runners.methods import get_method

        ds_config = load_deepspeed_config(args.deepspeed)
        get_method(args.method).check_zero(
            args, zero_stage(ds_config), f"--deepspeed {args.deepspeed}", ds_config
        )
    plugin_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if (
        not getattr(args, "deepspeed", None)
        and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        and plugin_file
        and Path(plugin_file).is_file()
    ):
        # accelerate launch with a DeepSpeed plugin YAML: its JSON is known before any model loads
        from loralab.runners.launch import load_deepspeed_config, zero_stage
        from loralab.runners.methods import get_method

        ds_config = load_deepspeed_config(plugin_file)
        get_method(args.method).check_zero(
            args, zero_stage(ds_config), f"accelerate's DeepSpeed plugin ({plugin_file})", ds_config
        )
    check_output_dir_writable(args.output_dir)
    check_model_path(args.model_name_or_path)
    if getattr(args, "tokenizer_name", None):
        check_model_path(args.tokenizer_name, "--tokenizer_name")
    for flag in ("train_file", "validation_file", "eval_file"):
        if getattr(args, flag, None):
            check_data_file(getattr(args, flag), f"--{flag}")
    check_ranks(
        args.model_name_or_path,
        [rank_request(args.method, args)],
        auto_class=auto_class,
        heads=heads,
    )
