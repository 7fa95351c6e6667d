"""Smoke test of ``benchmarks/lora_speed.py``: a tiny ``--quick`` run, then the JSON's shape.

The benchmark runs in a subprocess (as a user runs it): it forks its memory-measuring children,
which is only safe from a process that has not run torch kernels yet.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_quick_benchmark

pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lora_speed.py"
TRAIN = ["floor", "full_ft", "dt_lora_all", "peft_lora_all", "dt_lora_all_saving", "dt_lora_qv",
         "peft_lora_qv"]
INFER = ["infer_base", "infer_dt_unmerged", "infer_peft_unmerged", "infer_dt_merged"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    return run_quick_benchmark(SCRIPT, out, "lora_speed_cpu.json"), out


def test_every_case_is_timed_and_measured(report: tuple[dict, Path]) -> None:
    data, _ = report
    cases = data["cases"]
    assert sorted(cases) == sorted(TRAIN + INFER)
    assert data["settings"]["steps"] >= 2
    for name, case in cases.items():
        t = case["time"]
        assert len(t["samples_s"]) == data["settings"]["steps"], name
        assert all(x > 0 for x in t["samples_s"]), name
        assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"], name
        assert t["spread_pct"] >= 0, name
        mem = case["memory"]
        assert "error" not in mem, (name, mem)
        assert isinstance(mem["peak_bytes"], int), name
        assert mem["peak_bytes"] >= mem["resident_before_step_bytes"] - 4 * 2**20, name
        if name in TRAIN:  # counted exactly: what the forward keeps for backward
            assert isinstance(mem["kept_bytes"], int) and mem["kept_bytes"] > 0, name
        else:
            assert "kept_bytes" not in mem, name
    env = data["environment"]
    for key in ("torch", "transformers", "peft", "device_name", "threads", "dtype",
                "malloc_timing"):
        assert env[key] is not None, key


def test_ratios_match_the_times(report: tuple[dict, Path]) -> None:
    cases = report[0]["cases"]

    def median(name: str) -> float:
        return cases[name]["time"]["median_s"]

    for name, case in cases.items():
        ratios = case["ratios"]
        ref = ratios["reference"]
        assert ref == ("floor" if name in TRAIN else "infer_base")
        assert math.isclose(ratios["time_vs_reference"], median(name) / median(ref), rel_tol=1e-9)
        ref_peak, peak = cases[ref]["memory"]["peak_bytes"], case["memory"]["peak_bytes"]
        if ref_peak > 0:
            assert math.isclose(ratios["memory_vs_reference"], peak / ref_peak, rel_tol=1e-9)
        if name in TRAIN:
            assert math.isclose(ratios["kept_vs_reference"], case["memory"]["kept_bytes"]
                                / cases[ref]["memory"]["kept_bytes"], rel_tol=1e-9)
        if case["peer"] is not None:
            peer = case["peer"]
            assert peer.startswith(("peft_", "infer_peft_")), peer
            assert math.isclose(ratios["time_vs_peer"], median(name) / median(peer),
                                rel_tol=1e-9)
    assert cases["floor"]["ratios"]["time_vs_reference"] == 1.0
    assert cases["infer_base"]["ratios"]["time_vs_reference"] == 1.0


def test_cases_compute_the_same_thing(report: tuple[dict, Path]) -> None:
    data, _ = report
    sanity, cases = data["sanity"], data["cases"]
    assert sanity["first_loss_max_abs_diff"] < 1e-4
    diffs = sanity["logits_rel_diff"]
    assert diffs["dt_unmerged_vs_base"] > 1e-3  # the adapters are not a no-op
    assert diffs["dt_unmerged_vs_peft_unmerged"] < 1e-5
    assert diffs["dt_merged_vs_dt_unmerged"] < 1e-4
    assert cases["floor"]["trainable_params"] == 0
    assert cases["dt_lora_all"]["trainable_params"] == cases["peft_lora_all"]["trainable_params"]
    assert cases["dt_lora_qv"]["trainable_params"] == cases["peft_lora_qv"]["trainable_params"]


def test_input_recipes_keep_less_than_saving_the_inputs(report: tuple[dict, Path]) -> None:
    """The same LoRA (its first loss equals every other case's, checked above): with
    ``core.recompute``'s recipes the forward keeps less (no norm outputs, no SwiGLU product)."""
    cases = report[0]["cases"]
    lean, saving = cases["dt_lora_all"], cases["dt_lora_all_saving"]
    assert lean["memory"]["kept_bytes"] < 0.9 * saving["memory"]["kept_bytes"]
    assert lean["trainable_params"] == saving["trainable_params"]


def test_markdown_table(report: tuple[dict, Path]) -> None:
    data, out = report
    table = (out / "lora_speed_cpu.md").read_text()
    for case in data["cases"].values():
        assert f"| {case['label']} |" in table


@pytest.mark.slow
def test_compiled_run(tmp_path: Path) -> None:
    """``--compile``: every case under ``torch.compile`` (inductor), the same sanity checks."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--compile", "--no-memory",
         "--activation-memory-budget", "0.85",
         "--cases", "dt_lora_all,infer_dt_unmerged", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "lora_speed_cpu_compiled_budget0.85.json").read_text())
    assert report["settings"]["compile"] is True
    assert report["settings"]["memory_budget"] == 0.85
    assert {"floor", "dt_lora_all", "infer_base", "infer_dt_unmerged"} <= set(report["cases"])
    assert report["sanity"]["logits_rel_diff"]["dt_unmerged_vs_base"] > 1e-3  # adapter on
    title = (tmp_path / "lora_speed_cpu_compiled_budget0.85.md").read_text().splitlines()[0]
    assert title.startswith("# LoRA speed — cpu") and "torch.compile" in title
    assert "activation memory budget 0.85" in title


def test_the_memory_budget_needs_compile(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--activation-memory-budget", "0.85",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert "--activation-memory-budget takes a fraction in [0, 1] and needs --compile" in (
        proc.stderr)
    assert not list(tmp_path.iterdir())


def test_fused_kernel_cases_need_cuda(tmp_path: Path) -> None:
    """The fused-kernel cases are left out of a CPU run (the report's case list above) and
    refused when named: on the CPU they would time the torch path under their name."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--cases", "floor,dt_lora_all_fused",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert "run deltatune's fused kernels, which need --device cuda" in proc.stderr
    assert not list(tmp_path.iterdir())
