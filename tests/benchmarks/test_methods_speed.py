"""Smoke test of ``benchmarks/methods_speed.py``: a tiny ``--quick`` run, then the JSON's shape.

The benchmark runs in a subprocess (as a user runs it): it forks its memory-measuring children,
which is only safe from a process that has not run torch kernels yet.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

import deltatune as dt
from helpers import run_quick_benchmark

pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "methods_speed.py"
#: Case-name stem -> registered method; every one must run (compacter only once registered).
METHODS = {"lora": "lora", "dora": "dora", "adalora": "adalora", "dylora": "dylora",
           "increlora": "increlora", "dynamic_rank": "dynamic_rank", "lora_ga": "lora_ga",
           "corda": "corda", "lora_sb": "lora_sb", "intrinsic": "intrinsic",
           "vera": "vera", "lora_xs": "lora_xs",
           "svfit": "svfit", "hut": "hut", "ia3": "ia3", "bitfit": "bitfit",
           "ln_tuning": "ln_tuning", "ssf": "ssf", "houlsby": "adapter", "pfeiffer": "adapter",
           "parallel": "adapter",
           "compacter": "compacter", "prompt": "prompt", "prefix": "prefix"}
PEERS = ("lora", "dora", "adalora", "vera", "ia3", "ln_tuning", "prompt", "prefix")
MERGEABLE = ("lora", "dora", "ia3", "bitfit", "ln_tuning", "ssf")


def _expected() -> tuple[list[str], list[str]]:
    present = [k for k, m in METHODS.items() if m in dt.methods()]
    assert "compacter" in present or "compacter" not in dt.methods()
    train = ["floor", "full_ft"] + [f"dt_{k}" for k in present] + [f"peft_{k}" for k in PEERS]
    infer = (["infer_base"] + [f"infer_dt_{k}" for k in present]
             + [f"infer_peft_{k}" for k in PEERS]
             + [f"infer_dt_{k}_merged" for k in present
                if dt.get_method(METHODS[k]).delta_class.mergeable])
    return train, infer


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    return run_quick_benchmark(SCRIPT, out, "methods_speed_cpu.json"), out


def test_every_case_is_timed_and_measured(report: tuple[dict, Path]) -> None:
    data, _ = report
    train, infer = _expected()
    cases = data["cases"]
    assert sorted(cases) == sorted(train + infer)
    assert data["benchmark"] == "methods_speed"
    assert data["settings"]["steps"] >= 2
    for name, case in cases.items():
        assert case["kind"] == ("train" if name in train else "infer"), name
        t = case["time"]
        assert len(t["samples_s"]) == data["settings"]["steps"], name
        assert all(x > 0 for x in t["samples_s"]), name
        assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"], name
        mem = case["memory"]
        assert "error" not in mem, (name, mem)
        assert isinstance(mem["peak_bytes"], int), name
        assert mem["peak_bytes"] >= mem["resident_before_step_bytes"] - 4 * 2**20, name
    env = data["environment"]
    for key in ("torch", "transformers", "peft", "device_name", "threads", "dtype",
                "malloc_timing", "load_avg_1m_start", "load_avg_1m_end"):
        assert env[key] is not None, key
    # The only method allowed to be missing is the one still being written.
    assert set(data["skipped_methods"]) <= {"compacter"}


def test_ratios_match_the_times(report: tuple[dict, Path]) -> None:
    cases = report[0]["cases"]

    def median(name: str) -> float:
        return cases[name]["time"]["median_s"]

    for name, case in cases.items():
        ratios = case["ratios"]
        ref = ratios["reference"]
        assert ref == ("floor" if case["kind"] == "train" else "infer_base")
        assert math.isclose(ratios["time_vs_reference"], median(name) / median(ref), rel_tol=1e-9)
        ref_peak, peak = cases[ref]["memory"]["peak_bytes"], case["memory"]["peak_bytes"]
        if ref_peak > 0:
            assert math.isclose(ratios["memory_vs_reference"], peak / ref_peak, rel_tol=1e-9)
        if case["peer"] is not None:
            peer = case["peer"]
            assert math.isclose(ratios["time_vs_peer"], median(name) / median(peer),
                                rel_tol=1e-9)
            peer_peak = cases[peer]["memory"]["peak_bytes"]
            if peer_peak > 0:
                assert math.isclose(ratios["memory_vs_peer"], peak / peer_peak, rel_tol=1e-9)
    # Exactly the methods peft has are compared to a peer, in both tables.
    peered = {n: c["peer"] for n, c in cases.items() if c["peer"] is not None}
    assert peered == {**{f"dt_{k}": f"peft_{k}" for k in PEERS},
                      **{f"infer_dt_{k}": f"infer_peft_{k}" for k in PEERS}}
    assert cases["floor"]["ratios"]["time_vs_reference"] == 1.0
    assert cases["infer_base"]["ratios"]["time_vs_reference"] == 1.0


def test_cases_compute_the_same_thing(report: tuple[dict, Path]) -> None:
    data, _ = report
    sanity, cases = data["sanity"], data["cases"]
    assert sanity["first_loss_max_abs_diff"] < 1e-4  # over the identity-at-init methods
    assert sanity["first_loss_not_identity"] == ["dt_prefix", "dt_prompt", "peft_prefix",
                                                 "peft_prompt"]
    diffs = sanity["logits_rel_diff"]
    present = [k for k, m in METHODS.items() if m in dt.methods()]
    assert sorted(diffs) == sorted(present)
    for key, d in diffs.items():
        assert d["dt_unmerged_vs_base"] > 1e-3, key  # the adapters are not a no-op
        assert ("dt_unmerged_vs_peft_unmerged" in d) == (key in PEERS), key
        assert d.get("dt_unmerged_vs_peft_unmerged", 0.0) < 1e-5, key
        if key in MERGEABLE:
            assert d["dt_merged_vs_dt_unmerged"] < 1e-4, key
    assert set(sanity["peft_copied_modules"]) == set(PEERS)
    assert all(n > 0 for n in sanity["peft_copied_modules"].values())
    base = sanity["base_params"]
    assert cases["floor"]["trainable_params"] == 0
    assert cases["full_ft"]["trainable_params"] == base
    for key in PEERS:
        assert cases[f"dt_{key}"]["trainable_params"] == cases[f"peft_{key}"]["trainable_params"]
    for name, case in cases.items():
        if case["kind"] == "train":
            assert math.isclose(case["trainable_pct_of_base"],
                                100 * case["trainable_params"] / base), name
            assert name in ("floor", "full_ft") or 0 < case["trainable_params"] < base, name


def test_markdown_table(report: tuple[dict, Path]) -> None:
    data, out = report
    table = (out / "methods_speed_cpu.md").read_text()
    for case in data["cases"].values():
        assert f"| {case['label']} |" in table
    for key in data["sanity"]["logits_rel_diff"]:
        assert f"| {key} |" in table
    for key in data["skipped_methods"]:
        assert f"Skipped: {key}" in table


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("methods_speed_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_case_selection() -> None:
    """``--cases`` keeps the named cases plus the references every ratio needs."""
    bench = _load_script()
    settings, _ = bench.h.parse_args(bench.SUITE, ["--quick", "--cases", "dt_ia3,infer_dt_ia3"])
    assert settings.cases == ("dt_ia3", "infer_dt_ia3")
    assert settings.steps == 3 and settings.preset == "quick"
    selected = [c.name for c in bench.h.select_cases(bench.SUITE, settings.cases)]
    assert selected == ["floor", "dt_ia3", "infer_base", "infer_dt_ia3"]
    with pytest.raises(SystemExit):
        bench.h.parse_args(bench.SUITE, ["--cases", "dt_nope"])
    for name in bench.SUITE.skipped:  # a method that is not registered: a clear refusal
        with pytest.raises(SystemExit):
            bench.h.parse_args(bench.SUITE, ["--cases", name])


def test_shared_weights_time_the_same_computations(report: tuple[dict, Path],
                                                    tmp_path: Path) -> None:
    """``--share-weights yes`` (CUDA's default): every case builds on the one frozen copy of the
    base (the harness refuses a case that would unfreeze or rewrite it), and each computes what
    it computes on its own copy: the same first losses, the same outputs against peft."""
    shared = run_quick_benchmark(SCRIPT, tmp_path, "methods_speed_cpu.json", "--no-memory",
                                 "--share-weights", "yes")
    alone = report[0]
    assert shared["settings"]["share_weights"] and not alone["settings"]["share_weights"]
    assert set(shared["cases"]) == set(alone["cases"])
    assert shared["sanity"]["first_loss"] == alone["sanity"]["first_loss"]
    assert shared["sanity"]["logits_rel_diff"] == alone["sanity"]["logits_rel_diff"]
    assert "share the frozen base weights" in (tmp_path / "methods_speed_cpu.md").read_text()
