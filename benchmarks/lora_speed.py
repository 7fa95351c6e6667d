#!/usr/bin/env python
"""LoRA speed and memory: deltatune vs HF peft vs the floor, side by side in one run.

One randomly initialised ``LlamaForCausalLM`` (built from a ``LlamaConfig``, no downloads) is
copied into every case, and every case sees the same token batch:

training (forward + backward + AdamW step on the trainable parameters)

* ``floor``          the frozen base's own forward + backward: every parameter frozen, the
                     gradient flows back through every layer into ``inputs_embeds`` (no
                     optimizer step) — what any adapter pays at least;
* ``full_ft``        full fine-tuning, every parameter trainable;
* ``dt_lora_all`` / ``peft_lora_all``  LoRA r=16, alpha=32 on every linear layer but the head;
* ``dt_lora_qv``  / ``peft_lora_qv``   the same on ``q_proj`` and ``v_proj`` only;

inference (``torch.no_grad()`` forward)

* ``infer_base``, ``infer_dt_unmerged``, ``infer_peft_unmerged`` (LoRA on every linear layer,
  identical non-zero adapter weights in both libraries), ``infer_dt_merged`` (``dt.merge``).

Speed: warm-up steps, then ``--steps`` rounds in each of which every case runs one step, in a
freshly shuffled order (a fixed order would give each case the same predecessor, whose freed
memory and cache state it inherits), so that machine noise hits every case alike; every case
keeps its own model alive throughout. Reported: median, min, IQR spread. On CPU, glibc's
malloc is set to keep freed memory (``--malloc cached``, the default): with its defaults every
step page-faults in fresh memory, by an amount that depends on the case that ran just before,
which adds noise as large as the differences measured (``--malloc default`` to see it; the
JSON records the minor page faults per step).

Memory: each case runs again in a fresh child process (two at a time where the cores allow;
the peaks are per process): record the baseline after imports and a throw-away step on a tiny model,
build the model and optimizer, run the warm-up steps, reset the peak counter, run one step and
report the peak minus the baseline. On CPU the peak is the resident set size (Linux: write
``5`` to ``/proc/self/clear_refs`` to reset ``VmHWM``, then read it after the step; where that
is unavailable, a sampling thread, flagged in the output); on CUDA it is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

Every figure is also reported as a ratio to the floor (training) or the base (inference), and
ours to peft's. Results go to ``<out>/lora_speed_<device>.json`` and ``.md``.

Usage::

    python benchmarks/lora_speed.py                     # CPU, float32, a few minutes
    python benchmarks/lora_speed.py --device cuda       # bfloat16, ~1B-parameter Llama
    python benchmarks/lora_speed.py --quick --out /tmp/bench   # tiny smoke run
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:  # optional progress bar
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - optional dependency
    tqdm = None

import deltatune as dt

try:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as exc:  # pragma: no cover - dev dependency
    raise SystemExit("this benchmark needs transformers: pip install -e '.[dev]'") from exc
try:
    import peft
except ImportError:  # pragma: no cover - dev dependency
    peft = None

# peft calls a transformers method that transformers 5 deprecated; not ours to fix here.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTER = "a"
RANK, ALPHA = 16, 32
LR = 1e-4

#: Model and batch shapes per preset; any field can be overridden on the command line.
PRESETS: dict[str, dict[str, int]] = {
    "quick": dict(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=4, vocab=512,
                  batch=2, seq=32),
    "cpu": dict(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8, vocab=8192,
                batch=4, seq=256),
    "gpu": dict(hidden=2048, intermediate=5504, layers=16, heads=16, kv_heads=16, vocab=32000,
                batch=8, seq=1024),
}
_MIB = 2**20


@dataclass(frozen=True)
class Settings:
    device: str
    dtype: str
    preset: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    warmup: int
    steps: int
    seed: int
    threads: int
    memory: bool
    malloc: str
    cases: tuple[str, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# --------------------------------------------------------------------------------- cases
@dataclass
class Runner:
    """One case: its own model, optimizer and inputs; ``step()`` runs one timed step."""

    model: nn.Module
    ids: Tensor
    kind: str  # "train" | "infer"
    optimizer: torch.optim.Optimizer | None = None
    embeds: Tensor | None = None  # floor: a leaf that receives the gradient
    trainable: int = 0

    def step(self) -> Tensor:
        if self.kind == "infer":
            with torch.no_grad():
                return self.model(input_ids=self.ids).logits
        if self.embeds is not None:
            self.embeds.grad = None
            loss = self.model(inputs_embeds=self.embeds, labels=self.ids).loss
            loss.backward()
            return loss
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def build_base(s: Settings) -> nn.Module:
    """The seeded random Llama every case copies (same seed → same weights in every process)."""
    config = LlamaConfig(
        hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
        max_position_embeddings=max(s.seq, 128), tie_word_embeddings=False, use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(s.seed)
    with torch.device(s.device):
        model = LlamaForCausalLM(config)
    return model.to(s.torch_dtype)


def make_ids(s: Settings) -> Tensor:
    gen = torch.Generator().manual_seed(s.seed + 1)
    return torch.randint(0, s.vocab, (s.batch, s.seq), generator=gen).to(s.device)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _train(model: nn.Module, ids: Tensor) -> Runner:
    params = _trainable(model)
    model.train()
    return Runner(model, ids, "train", optimizer=torch.optim.AdamW(params, lr=LR),
                  trainable=sum(p.numel() for p in params))


def _floor(base: nn.Module, ids: Tensor) -> Runner:
    base.requires_grad_(False).train()
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
    return Runner(base, ids, "train", embeds=embeds.detach().requires_grad_(True))


def _full(base: nn.Module, ids: Tensor) -> Runner:
    return _train(base.requires_grad_(True), ids)


def _dt(targets: str | list[str]) -> Callable[[nn.Module], nn.Module]:
    def inject(model: nn.Module) -> nn.Module:
        return dt.inject(model, dt.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets),
                         name=ADAPTER)
    return inject


def _peft(targets: str | list[str]) -> Callable[[nn.Module], nn.Module]:
    def inject(model: nn.Module) -> nn.Module:
        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                 target_modules=targets)
        return peft.get_peft_model(model, config)
    return inject


def _lora_train(adapt: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module, Tensor], Runner]:
    return lambda base, ids: _train(adapt(base), ids)


@torch.no_grad()
def _perturb(model: nn.Module, seed: int) -> None:
    """Give the adapter non-zero weights (B starts at zero), the same ones in every process."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def _copy_dt_into_peft(dt_model: nn.Module, peft_model: nn.Module) -> int:
    """Copy deltatune's A, B into peft's ``lora_A`` / ``lora_B`` (same function, same weights)."""
    ours = dict(dt_model.named_parameters())
    copied = 0
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or "default" not in lora_a:
            continue
        path = name.removeprefix("base_model.model.")
        lora_a["default"].weight.copy_(ours[f"{path}.deltas.{ADAPTER}.A"])
        module.lora_B["default"].weight.copy_(ours[f"{path}.deltas.{ADAPTER}.B"])
        copied += 1
    if copied != sum(name.endswith(f".deltas.{ADAPTER}.A") for name in ours):
        raise RuntimeError(f"copied {copied} LoRA layers into peft's model; the two libraries "
                           "did not adapt the same layers")
    return copied


def _infer_dt(*, merged: bool, seed: int) -> Callable[[nn.Module, Tensor], Runner]:
    def build(base: nn.Module, ids: Tensor) -> Runner:
        model = _dt("all-linear")(base)
        _perturb(model, seed)
        if merged:
            dt.merge(model)
        return Runner(model.eval(), ids, "infer")
    return build


def _infer_peft(seed: int) -> Callable[[nn.Module, Tensor], Runner]:
    def build(base: nn.Module, ids: Tensor) -> Runner:
        reference = _dt("all-linear")(copy.deepcopy(base))
        _perturb(reference, seed)
        model = _peft("all-linear")(base)
        _copy_dt_into_peft(reference, model)
        return Runner(model.eval(), ids, "infer")
    return build


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    kind: str  # "train" | "infer"
    build: Callable[[nn.Module, Tensor], Runner]
    peer: str | None = None  # the peft case this deltatune case is compared to
    needs_peft: bool = False


QV = ["q_proj", "v_proj"]
ADAPTER_SEED = 4321
CASES: tuple[Case, ...] = (
    Case("floor", "floor: frozen base fwd+bwd", "train", _floor),
    Case("full_ft", "full fine-tuning", "train", _full),
    Case("dt_lora_all", "deltatune LoRA all-linear", "train", _lora_train(_dt("all-linear")),
         peer="peft_lora_all"),
    Case("peft_lora_all", "peft LoRA all-linear", "train", _lora_train(_peft("all-linear")),
         needs_peft=True),
    Case("dt_lora_qv", "deltatune LoRA q,v", "train", _lora_train(_dt(QV)), peer="peft_lora_qv"),
    Case("peft_lora_qv", "peft LoRA q,v", "train", _lora_train(_peft(QV)), needs_peft=True),
    Case("infer_base", "base", "infer",
         lambda base, ids: Runner(base.requires_grad_(False).eval(), ids, "infer")),
    Case("infer_dt_unmerged", "deltatune LoRA unmerged", "infer",
         _infer_dt(merged=False, seed=ADAPTER_SEED), peer="infer_peft_unmerged"),
    Case("infer_peft_unmerged", "peft LoRA unmerged", "infer", _infer_peft(ADAPTER_SEED),
         needs_peft=True),
    Case("infer_dt_merged", "deltatune LoRA merged", "infer",
         _infer_dt(merged=True, seed=ADAPTER_SEED)),
)
BY_NAME = {c.name: c for c in CASES}
REFERENCE = {"train": "floor", "infer": "infer_base"}


def build_runner(case: Case, base: nn.Module, ids: Tensor) -> Runner:
    torch.manual_seed(0)  # adapter initialisation: the same stream for every case
    return case.build(base, ids)


# --------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str) -> Any:
    if tqdm is None:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def time_cases(s: Settings, cases: list[Case]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Build every case, check that they compute the same thing, then time them interleaved."""
    base, ids = build_base(s), make_ids(s)
    runners = {c.name: build_runner(c, copy.deepcopy(base), ids) for c in cases}
    del base
    sanity = check_outputs(runners)
    bar = _progress((s.warmup + s.steps) * len(runners), "timing")
    for _ in range(s.warmup):
        for runner in runners.values():
            runner.step()
            bar.update()
    _sync(s.device)
    times: dict[str, list[float]] = {name: [] for name in runners}
    faults: dict[str, list[int]] = {name: [] for name in runners}
    order, rng = list(runners), random.Random(s.seed)
    for _ in range(s.steps):
        rng.shuffle(order)  # a fixed order would give each case the same predecessor
        for name in order:
            _sync(s.device)
            faults_before, start = _minor_faults(), time.perf_counter()
            runners[name].step()
            _sync(s.device)
            times[name].append(time.perf_counter() - start)
            faults[name].append(_minor_faults() - faults_before)
            bar.update()
    bar.close()
    sanity["trainable_params"] = {n: r.trainable for n, r in runners.items() if r.kind == "train"}
    sanity["minor_page_faults_per_step_median"] = {n: statistics.median(f)
                                                   for n, f in faults.items()}
    return times, sanity


@torch.no_grad()
def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_outputs(runners: dict[str, Runner]) -> dict[str, Any]:
    """Before timing: the cases compute the same thing (else the comparison means nothing).

    Training cases are all identical at initialisation (LoRA's B starts at zero), so their
    first losses agree; the inference adapters are non-zero and identical in both libraries.
    """
    out: dict[str, Any] = {}
    losses = {n: float(r.step().detach()) for n, r in runners.items() if r.kind == "train"}
    if losses:
        first = next(iter(losses.values()))
        out["first_loss"] = losses
        out["first_loss_max_abs_diff"] = max(abs(v - first) for v in losses.values())
    logits = {n: r.step() for n, r in runners.items() if r.kind == "infer"}
    pairs = {"dt_unmerged_vs_base": ("infer_dt_unmerged", "infer_base"),
             "dt_unmerged_vs_peft_unmerged": ("infer_dt_unmerged", "infer_peft_unmerged"),
             "dt_merged_vs_dt_unmerged": ("infer_dt_merged", "infer_dt_unmerged")}
    out["logits_rel_diff"] = {key: _rel(logits[a], logits[b]) for key, (a, b) in pairs.items()
                              if a in logits and b in logits}
    return out


def time_stats(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    median = statistics.median(ordered)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = median
    return {"median_s": median, "min_s": ordered[0], "max_s": ordered[-1], "iqr_s": q3 - q1,
            "spread_pct": 100 * (q3 - q1) / median, "samples_s": samples}


# --------------------------------------------------------------------------------- memory
def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss() -> int:
    value = _proc_status("VmRSS")
    if value is not None:
        return value
    import resource  # not Linux: the best we have is the peak since the process started

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                                 else 1024)


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False if we can't."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status("VmHWM"), _proc_status("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 4 * _MIB


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters


def _mallopt(*settings: tuple[int, int]) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(key, value) == 1 for key, value in settings)
    except (OSError, AttributeError):  # not glibc
        return False


def _pin_malloc() -> bool:
    """Memory children (glibc): serve every allocation over 64 KiB by mmap, unmapped on free.

    glibc's default raises its mmap threshold dynamically, after which freed tensors stay in
    the heap and keep counting in the RSS; pinning it makes the RSS follow live tensors.
    """
    return _mallopt((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 64 * 1024),
                    (_M_TRIM_THRESHOLD, 64 * 1024))


def _cache_malloc() -> bool:
    """Timing process (glibc): keep freed memory for reuse, like CUDA's caching allocator.

    By default glibc maps every large tensor afresh (or trims the heap) and the next step pays
    a page fault per 4 KiB; with several models in one process how many depends on which case
    ran before. That noise is as large as the differences measured here, so: no mmap for
    chunks, no trimming — after the warm-up a step allocates nothing new from the kernel.
    """
    return _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Sampler:
    """Fallback peak-RSS reader: polls the RSS from a thread (can miss short spikes)."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _prime(s: Settings, name: str) -> None:
    """Run the case once on the tiny model and free it, before the baseline is taken.

    The first step loads what imports leave for later (transformers' lazy modules, the thread
    pool, oneDNN / cuBLAS state); without this, that one-off cost would count as the case's.
    """
    tiny = replace(s, **PRESETS["quick"])
    runner = build_runner(BY_NAME[name], build_base(tiny), make_ids(tiny))
    for _ in range(2):
        runner.step()
    del runner
    gc.collect()
    _sync(s.device)


def measure_memory(s: Settings, name: str) -> dict[str, Any]:
    """In a fresh process: peak memory of one step of case ``name`` over the import baseline."""
    torch.set_num_threads(s.threads)
    cuda = s.device == "cuda"
    pinned = False if cuda else _pin_malloc()
    _prime(s, name)
    baseline = torch.cuda.memory_allocated() if cuda else _rss()
    runner = build_runner(BY_NAME[name], build_base(s), make_ids(s))
    for _ in range(max(s.warmup, 1)):
        runner.step()
    _sync(s.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = runner.step()
        _sync(s.device)
        peak, method = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    elif _reset_hwm():
        before = _rss()
        result = runner.step()
        peak, method = _proc_status("VmHWM"), "vmhwm_reset_by_clear_refs"
    else:
        before = _rss()
        with _Sampler() as sampler:
            result = runner.step()
        peak, method = sampler.peak, "rss_sampled_every_0.5ms"
    del result
    return {"peak_bytes": peak - baseline, "resident_before_step_bytes": before - baseline,
            "step_increase_bytes": peak - before, "baseline_bytes": baseline, "method": method,
            "malloc_pinned": pinned}


def _memory_child(settings: dict[str, Any], name: str, conn: Any) -> None:
    try:
        conn.send(measure_memory(Settings(**settings), name))
    except BaseException as exc:  # report, don't hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


_COMPUTED_IN_THIS_PROCESS = False  # fork is only safe before the parent ran torch kernels


def memory_cases(s: Settings, cases: list[Case]) -> tuple[dict[str, dict[str, Any]], str]:
    """Run ``measure_memory`` for every case, each in a fresh child process."""
    method = "fork" if (s.device == "cpu" and not _COMPUTED_IN_THIS_PROCESS
                        and "fork" in mp.get_all_start_methods()) else "spawn"
    ctx = mp.get_context(method)
    settings = {f.name: getattr(s, f.name) for f in fields(s)}
    # Peaks are per process, so children may overlap — where the cores allow it (two children
    # with more threads than cores would just slow each other down).
    jobs = max(1, min(2, (os.cpu_count() or 1) // max(s.threads, 1)))
    out: dict[str, dict[str, Any]] = {}
    pending, running = [c.name for c in cases], {}
    bar = _progress(len(cases), "memory")
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_memory_child, args=(settings, name, child))
            proc.start()
            child.close()
            running[parent] = (proc, name)
        for conn in mp_connection.wait(list(running)):
            proc, name = running.pop(conn)
            try:
                out[name] = conn.recv()
            except EOFError:
                proc.join()
                out[name] = {"error": f"child exited with code {proc.exitcode}"}
            proc.join()
            bar.update()
    bar.close()
    return {c.name: out[c.name] for c in cases}, method


# --------------------------------------------------------------------------------- report
def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def assemble(s: Settings, cases: list[Case], times: dict[str, list[float]],
             memory: dict[str, dict[str, Any]], sanity: dict[str, Any],
             env: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for case in cases:
        mem = memory.get(case.name, {})
        results[case.name] = {"label": case.label, "kind": case.kind, "peer": case.peer,
                              "time": time_stats(times[case.name]), "memory": mem}
        if case.kind == "train":
            results[case.name]["trainable_params"] = sanity["trainable_params"][case.name]

    def median(name: str) -> float | None:
        return results[name]["time"]["median_s"] if name in results else None

    def peak(name: str) -> float | None:
        return results.get(name, {}).get("memory", {}).get("peak_bytes")

    for name, entry in results.items():
        ref = REFERENCE[entry["kind"]]
        entry["ratios"] = {
            "reference": ref,
            "time_vs_reference": _ratio(median(name), median(ref)),
            "memory_vs_reference": _ratio(peak(name), peak(ref)),
        }
        if entry["peer"] in results:
            entry["ratios"].update(time_vs_peer=_ratio(median(name), median(entry["peer"])),
                                   memory_vs_peer=_ratio(peak(name), peak(entry["peer"])))
    return {"benchmark": "lora_speed", "created": datetime.datetime.now().isoformat(
        timespec="seconds"), "environment": env, "settings": asdict(s),
        "definitions": DEFINITIONS, "cases": results, "sanity": sanity}


DEFINITIONS = {
    "time": "seconds per step, one model per case, one step of every case per round in a "
            "shuffled order; spread_pct = (p75 - p25) / median",
    "memory.peak_bytes": "peak during one step (after warm-up) minus the baseline taken in a "
                         "fresh process after imports and a throw-away run on a tiny model; "
                         "CPU: resident set size, CUDA: max_memory_allocated",
    "memory.resident_before_step_bytes": "weights, optimizer state and inputs held between steps",
    "memory.step_increase_bytes": "peak minus resident: activations, gradients, temporaries",
    "ratios": "time: median / reference median; memory: peak / reference peak; reference = "
              "floor (training) or infer_base (inference); peer = the peft case",
    "sanity.minor_page_faults_per_step_median": "fresh 4 KiB pages the timing process took from "
                                                "the kernel during a step (CPU allocator churn)",
    "environment.malloc_timing": "the glibc malloc configuration of the timing process",
}


def environment(s: Settings, memory_start: str | None, load_start: float | None
                ) -> dict[str, Any]:
    device_name = torch.cuda.get_device_name() if s.device == "cuda" else _cpu_name()
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": getattr(peft, "__version__", None), "deltatune": dt.__version__,
        "git": _git_revision(), "device": s.device, "device_name": device_name,
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "dtype": s.dtype,
        "memory_process_start": memory_start, "load_avg_1m_start": load_start,
        "load_avg_1m_end": _load_avg(),
    }


def _load_avg() -> float | None:
    """Other processes competing for the CPU make every timing noisier: record the load."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root,
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty-src" if dirty else "")


def _fmt_load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _fmt_x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _fmt_mib(value: int | None) -> str:
    return "—" if value is None else f"{value / _MIB:,.1f}"


def markdown(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    lines = [
        f"# LoRA speed — {env['device']} ({env['device_name']})",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"deltatune {env['deltatune']} ({env['git']}); {s['dtype']}, torch threads: "
        f"{env['threads']} (CPU cores: {env['cpu_count']}).  ",
        f"Llama: hidden {s['hidden']}, intermediate {s['intermediate']}, {s['layers']} layers, "
        f"{s['heads']} heads, vocab {s['vocab']}; batch {s['batch']} × seq {s['seq']}; "
        f"{s['warmup']} warm-up + {s['steps']} measured steps per case, interleaved (shuffled "
        f"rounds); malloc: {env.get('malloc_timing', 'default')}.  ",
        "LoRA r=16, alpha=32. Times: median (min, IQR spread); memory: peak during one step "
        "minus the post-import baseline, each case in a fresh process.  ",
        f"1-minute load average: {_fmt_load(env['load_avg_1m_start'])} at the start, "
        f"{_fmt_load(env['load_avg_1m_end'])} at the end (this run adds about the thread "
        f"count); {report['created']}.",
    ]
    for kind, title, ref in (("train", "Training step (fwd + bwd + AdamW)", "floor"),
                             ("infer", "Inference (no_grad forward)", "base")):
        rows = {n: c for n, c in report["cases"].items() if c["kind"] == kind}
        if not rows:
            continue
        lines += ["", f"## {title}", "",
                  f"| case | median ms | min ms | spread | time × {ref} | time vs peft "
                  f"| peak MiB | mem × {ref} | mem vs peft |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in rows.values():
            t, r, m = c["time"], c["ratios"], c["memory"]
            lines.append(
                f"| {c['label']} | {t['median_s'] * 1e3:,.1f} | {t['min_s'] * 1e3:,.1f} | "
                f"{t['spread_pct']:.1f}% | {_fmt_x(r['time_vs_reference'])} | "
                f"{_fmt_x(r.get('time_vs_peer'))} | {_fmt_mib(m.get('peak_bytes'))} | "
                f"{_fmt_x(r['memory_vs_reference'])} | {_fmt_x(r.get('memory_vs_peer'))} |")
    sanity = report["sanity"]
    checks = [f"first-loss spread across training cases "
              f"{sanity.get('first_loss_max_abs_diff', float('nan')):.2e}"]
    checks += [f"{k} {v:.2e}" for k, v in sanity.get("logits_rel_diff", {}).items()]
    lines += ["", "Sanity (relative differences): " + "; ".join(checks) + "."]
    errors = {n: c["memory"]["error"] for n, c in report["cases"].items()
              if "error" in c["memory"]}
    if errors:
        lines += ["", f"Memory errors: {errors}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model/batch shape preset (default: cpu or gpu after --device)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: the tiny preset, 1 warm-up and 3 measured steps")
    for key in PRESETS["cpu"]:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"override the preset's {key}")
    p.add_argument("--warmup", type=int, help="warm-up steps per case (default 2; quick 1)")
    p.add_argument("--steps", type=int, help="measured steps per case (default 40; quick 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--malloc", choices=["cached", "default"], default="cached",
                   help="CPU timing: configure glibc malloc to cache freed memory (default; no "
                        "page faults after warm-up) or leave its defaults")
    p.add_argument("--cases", help=f"comma-separated subset of {[c.name for c in CASES]}")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output directory ({RESULTS})")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    preset = a.preset or ("quick" if a.quick else "gpu" if a.device == "cuda" else "cpu")
    shape = {k: getattr(a, k) if getattr(a, k) is not None else v
             for k, v in PRESETS[preset].items()}
    names = tuple(CASES_ORDER) if a.cases is None else tuple(a.cases.split(","))
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {CASES_ORDER}")
    if peft is None:
        names = tuple(n for n in names if not BY_NAME[n].needs_peft)
    settings = Settings(
        device=a.device, dtype=a.dtype or ("bfloat16" if a.device == "cuda" else "float32"),
        preset=preset, warmup=a.warmup if a.warmup is not None else (1 if a.quick else 2),
        steps=a.steps if a.steps is not None else (3 if a.quick else 40), seed=a.seed,
        threads=a.threads or torch.get_num_threads(), memory=not a.no_memory,
        malloc=a.malloc, cases=names,
        **shape)
    if settings.steps < 1 or settings.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return settings, a.out


CASES_ORDER = [c.name for c in CASES]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global _COMPUTED_IN_THIS_PROCESS
    s, out = parse_args(argv)
    torch.set_num_threads(s.threads)
    # The references are always measured (every ratio needs them); cases keep CASES' order.
    wanted = set(s.cases) | {REFERENCE[BY_NAME[n].kind] for n in s.cases}
    cases = [c for c in CASES if c.name in wanted]
    s = replace(s, cases=tuple(c.name for c in cases))
    load = _load_avg()
    if load is not None and s.device == "cpu" and load > 0.5:
        print(f"warning: 1-minute load average {load:.2f} before starting; other processes "
              "will add noise to the CPU timings", file=sys.stderr)
    clock = time.perf_counter()
    memory, start = memory_cases(s, cases) if s.memory else ({}, None)
    _COMPUTED_IN_THIS_PROCESS = True
    wall = {"memory_s": time.perf_counter() - clock}
    malloc = "default"
    if s.device == "cpu" and s.malloc == "cached":
        malloc = ("glibc caching: M_MMAP_MAX=0, no trim" if _cache_malloc()
                  else "default (caching requested; not glibc)")
    times, sanity = time_cases(s, cases)
    wall["timing_s"] = time.perf_counter() - clock - wall["memory_s"]
    report = assemble(s, cases, times, memory, sanity, environment(s, start, load))
    report["environment"]["malloc_timing"] = malloc
    report["wall"] = wall
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lora_speed_{s.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md")
    return report


if __name__ == "__main__":
    main()
