"""End to end: the README's ``make demo`` example runs and learns its task."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_trains_saves_reloads_and_merges() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    accuracies = [float(a) for a in re.findall(r"accuracy[^0-9]*([0-9.]+)%", proc.stdout)]
    assert accuracies, proc.stdout
    assert max(accuracies) >= 90.0, proc.stdout
