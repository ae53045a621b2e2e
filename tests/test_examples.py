"""The examples run (in their ``--quick`` form) and write what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    ).stdout


def test_tensor_dropout_example(tmp_path):
    pytest.importorskip("matplotlib")
    out = _run("tensor_dropout.py", "--quick", "--out", str(tmp_path), cwd=tmp_path)
    table = (tmp_path / "tensor_dropout.md").read_text()
    assert (tmp_path / "tensor_dropout.png").stat().st_size > 0
    assert table.count("| spatial |") == 4 and table.count("| channel |") == 4
    assert "spatial sampling" in out


def test_train_digits_example(tmp_path):
    pytest.importorskip("sklearn")
    out = _run("train_digits_dropout.py", "--quick", cwd=tmp_path)
    assert "| exact |" in out and "| spatial p=0.5 |" in out
    assert "| channel p=0.5 |" in out


def test_backpack_quickstart_example(tmp_path):
    out = _run("backpack_quickstart.py", "--quick", cwd=tmp_path)
    assert "OK: all fields equal stock BackPACK's" in out
    assert "| diag_ggn_exact |" in out and "| kfac |" in out


def test_curvlinops_kfac_example(tmp_path):
    out = _run("curvlinops_kfac.py", "--quick", cwd=tmp_path)
    assert out.count("stock curvlinops.KFACLinearOperator refuses") == 2
    assert "OK: TN operators match the references" in out


def test_backpack_to_curvlinops_example(tmp_path):
    out = _run("backpack_to_curvlinops.py", "--quick", cwd=tmp_path)
    assert "KFAC Lanczos vs exact" in out and "preconditioner KFAC" in out
    assert "OK: all checks pass" in out


def test_kfac_training_example(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = _run("kfac_training.py", "--quick", "--out", str(tmp_path), cwd=tmp_path)
    assert (tmp_path / "kfac_training.png").stat().st_size > 0
    for row in ("| SGD |", "| Adam |", "| KFAC |", "| KFAC, stock BackPACK |"):
        assert row in out
    assert "for the first 4 of 4 steps" in out


def test_laplace_example(tmp_path):
    # laplace-torch is the optional extra `laplace`, not a test dependency
    pytest.importorskip("laplace")
    pytest.importorskip("sklearn")
    out = _run("laplace_with_backpack_tn.py", "--quick", cwd=tmp_path)
    assert "OK: stock and TN posteriors agree" in out
    assert out.count("| Conv1d model | kron | Curvlinops") == 2
    assert out.count(" refused |") == 2
