"""The core demo (the README's temporary main job)."""

import subprocess
import sys

import pytest

from loralab.core.demo import TOLERANCE, main, run_demo


def test_main_prints_norms_singular_values_and_difference(capsys):
    assert main(["--arch", "gpt2", "--batches", "2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.1.mlp.c_proj" in out and "top singular values" in out
    assert "max |plain - offload|" in out and "(OK, tolerance" in out
    row = next(line for line in out.splitlines() if line.startswith("transformer.h.0.attn.c_attn"))
    assert (
        row.split()[1] == "192x64" and len(row.split()) == 3 + 3
    )  # name, shape, norm, 3 singular values


@pytest.mark.parametrize("arch", ["roberta", "t5"])
def test_run_demo_other_archs(arch, capsys):
    assert run_demo(arch, batches=1, top=2) <= TOLERANCE


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "loralab.core.demo", "--batches", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model.layers.1.mlp.down_proj" in proc.stdout and "OK" in proc.stdout


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["--batches", "0"])
    with pytest.raises(ValueError, match="arch must be one of"):
        run_demo("bert")
