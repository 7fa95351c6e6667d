"""Runs ``triton_cases.py`` (the Triton kernel on CPU tensors) in a pytest process of its own
under Triton's interpreter, which must be on before Triton is first imported."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or
                    importlib.util.find_spec("numpy") is None,
                    reason="Triton (and numpy, for its interpreter) not installed")
def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "DELTATUNE_KERNELS": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         "--rootdir", str(HERE.parents[1]), str(HERE / "triton_cases.py")],
        cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
