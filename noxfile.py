"""Developer sessions: `nox -l` lists them.

- ``test-<package>``: a fresh env with only that package, its real dependencies and its test extra.
- ``tests``: every package's tests in one env (what CI runs).
- ``lint``: ruff and mypy. ``build``: every wheel built alone and imported alone. ``bench``: all benchmarks.

uv reads ``UV_FIND_LINKS`` (not pip's ``PIP_FIND_LINKS``): we forward the latter so the local CPU
torch wheel is found, and every install is constrained by ``constraints.txt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).parent
CONSTRAINTS = ["-c", str(ROOT / "constraints.txt")]

# package -> the workspace packages it depends on (its real dependencies, nothing else)
PACKAGES: dict[str, list[str]] = {
    "core": [],
    "lora-ga": ["core"],
    "lora-fa": ["core"],
    "lora-sb": ["core"],
    "lora-pro": ["core"],
    "golore": ["core"],
    "runners": ["core", "lora-ga", "lora-fa", "lora-sb", "lora-pro", "golore"],
}
TEST_EXTRAS = {"runners": "all,test"}

if os.environ.get("PIP_FIND_LINKS") and not os.environ.get("UV_FIND_LINKS"):
    os.environ["UV_FIND_LINKS"] = os.environ["PIP_FIND_LINKS"]

# Compile every installed module to bytecode once, at install. uv does not by default, and where
# PYTHONDONTWRITEBYTECODE is set (as it is on our machines) no process caches what it compiles: each of the
# test suite's hundred-odd launched processes then recompiled torch, transformers, peft and DeepSpeed
# from source on import (`import peft`: 38 s cold, 15 s from bytecode, on the 2-core CI machine).
os.environ.setdefault("UV_COMPILE_BYTECODE", "1")


def _editable(pkg: str, extras: str | None = None) -> list[str]:
    path = f"packages/{pkg}" + (f"[{extras}]" if extras else "")
    return ["-e", path]


def _install_for_tests(session: nox.Session, pkgs: list[str]) -> None:
    args: list[str] = []
    for pkg in pkgs:
        args += _editable(pkg, TEST_EXTRAS.get(pkg, "test"))
    session.install(*args, *CONSTRAINTS)


def _pytest(session: nox.Session, paths: list[str]) -> None:
    session.run(
        "pytest",
        *paths,
        *session.posargs,
        env={"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"},
    )


def _make_test_session(pkg: str) -> None:
    def test(session: nox.Session) -> None:
        # only this package and the workspace packages it truly depends on
        for dep in PACKAGES[pkg]:
            session.install(*_editable(dep), *CONSTRAINTS)
        _install_for_tests(session, [pkg])
        _pytest(session, [f"packages/{pkg}/tests"])

    test.__doc__ = f"Run loralab-{pkg}'s tests in a fresh env holding only it and its dependencies."
    nox.session(name=f"test-{pkg}")(test)


for _pkg in PACKAGES:
    _make_test_session(_pkg)


@nox.session
def tests(session: nox.Session) -> None:
    """Every package's tests in one env (multi-process and slow tests included)."""
    _install_for_tests(session, list(PACKAGES))
    _pytest(session, [f"packages/{pkg}/tests" for pkg in PACKAGES])


# What mypy needs to resolve every import of the packages' src: the packages themselves (no test
# extras), bitsandbytes and matplotlib (typed), and stubs for psutil and tqdm. Modules without types
# (accelerate, datasets, deepspeed, ...) are listed in pyproject's [tool.mypy] overrides instead.
LINT_INSTALL = [
    *_editable("core", "quant"),
    *_editable("lora-ga"),
    *_editable("lora-fa"),
    *_editable("lora-sb"),
    *_editable("lora-pro"),
    *_editable("golore", "plot"),
    *_editable("runners"),
    "ruff>=0.6",
    "mypy>=1.13",
    "types-psutil",
    "types-tqdm",
]


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole repository (lint rules, then the formatter's check), then mypy over every
    package's src (configured in pyproject.toml's [tool.mypy])."""
    session.install(*LINT_INSTALL, *CONSTRAINTS)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def build(session: nox.Session) -> None:
    """Build every wheel alone, then install each into a clean env and import it.

    Proves "pip install only the method you need": each wheel resolves its loralab dependencies from
    the freshly built wheels only, and no wheel ships ``loralab/__init__.py`` (PEP 420 namespace).
    """
    import zipfile

    dist = ROOT / "dist"
    session.run("rm", "-rf", str(dist), external=True)
    for pkg in PACKAGES:
        session.run(
            "uv",
            "build",
            "--no-sources",
            "--package",
            f"loralab-{pkg}",
            "--out-dir",
            str(dist),
            external=True,
        )
    for pkg in PACKAGES:
        wheel = next(dist.glob(f"loralab_{pkg.replace('-', '_')}-*.whl"))
        names = zipfile.ZipFile(wheel).namelist()
        if "loralab/__init__.py" in names:
            session.error(
                f"{wheel.name} ships loralab/__init__.py: the namespace must stay PEP 420"
            )
        if not any(n.endswith("py.typed") for n in names):
            session.error(f"{wheel.name} lacks py.typed")
        venv = ROOT / ".nox" / f"wheel-{pkg}"
        session.run("uv", "venv", "-q", "--clear", str(venv), external=True)
        py = str(venv / "bin" / "python")
        session.run(
            "uv",
            "pip",
            "install",
            "-q",
            "--python",
            py,
            "--find-links",
            str(dist),
            str(wheel),
            *CONSTRAINTS,
            external=True,
        )
        module = "loralab." + pkg.replace("-", "_")
        session.run(
            py,
            "-c",
            f"import {module}; print('{module} ok from', {module}.__file__)",
            external=True,
        )


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmark under benchmarks/ side by side with its peer, then rebuild BENCHMARKS.md."""
    _install_for_tests(session, list(PACKAGES))
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    for script in scripts:
        session.run("python", str(script), *session.posargs)
    if "cuda" not in session.posargs:  # the LoRA-GA init's FSDP2 per-rank run (CPU, gloo)
        script = ROOT / "benchmarks" / "lora_ga_init.py"
        session.run("python", str(script), "--fsdp2", *session.posargs)
    session.run("python", str(ROOT / "benchmarks" / "_assemble.py"))
