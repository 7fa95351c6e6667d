"""The shared harness of the speed benchmarks (``lora_speed.py``, ``methods_speed.py``).

A benchmark script describes its cases (``Case``: a name, a label, ``"train"`` or ``"infer"``,
a function building a ``Runner`` from a copy of the base model and the token batch, and the
peft case it is compared to) and how it checks and reports them (``Suite``); the harness does
the rest, the same way for every script:

* one seeded random ``LlamaForCausalLM`` (``build_base``, no downloads) copied into every
  case, one token batch (``make_ids``);
* timing (``time_cases``): every case keeps its own model alive; warm-up steps, then rounds in
  each of which every case runs one step, in a freshly shuffled order; glibc's malloc set to
  keep freed memory in the timing process (``--malloc cached``). With ``--share-weights`` (the
  default on CUDA, where no cache holds a model's weights anyway) the cases' models share the
  frozen base's tensors — one copy of an 8B model's weights instead of one per case — and only
  cases that write or train them (``Case.own_weights``: full fine-tuning, merged inference)
  get their own; a case that would change a shared tensor is refused when built;
* memory (``memory_cases``): every case again in a fresh child process (forked on CPU), peak
  over the post-import baseline — the resident set size on CPU (``VmHWM`` reset through
  ``/proc/self/clear_refs``), ``max_memory_allocated`` on CUDA;
* the report (``assemble``): time statistics, ratios to the reference case (the floor or the
  base) and to the peft peer, the environment (versions, device, load average), JSON and
  Markdown (``header_lines`` / ``table_lines``);
* the command line (``parse_args``) and the whole run (``main``).

A ``Suite`` registers itself by name when it is created: memory children look their cases up
there (a spawned child re-imports the script, which creates its suite again).
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:  # optional progress bar
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - optional dependency
    tqdm = None

import deltatune as dt
from deltatune.train.memory import TensorMemory, proc_status

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
LR = 1e-4

#: Model and batch shapes per preset; any field can be overridden on the command line.
PRESETS: dict[str, dict[str, int]] = {
    "quick": dict(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=4, vocab=512,
                  batch=2, seq=32),
    "cpu": dict(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8, vocab=8192,
                batch=4, seq=256),
    "gpu": dict(hidden=2048, intermediate=5504, layers=16, heads=16, kv_heads=16, vocab=32000,
                batch=8, seq=1024),
    # Llama-3-8B's shapes (random weights): do the ratios hold when the model grows?
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
               batch=2, seq=1024),
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
    compile: bool = False  # every case's model under torch.compile (the floor's too)
    #: torch.compile's ``activation_memory_budget`` (AOTAutograd's partitioner recomputes
    #: to keep saved activations under this fraction), for every case; ``None``: torch's
    memory_budget: float | None = None
    #: timing: the cases' models share the frozen base's tensors (``own_weights`` cases aside)
    share_weights: bool = False

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
    #: A method's per-step work besides the optimizer: a regulariser added to the loss, and
    #: its schedule's call after ``optimizer.step()`` (AdaLoRA's budget, DyLoRA's rank …).
    extra_loss: Callable[[], Tensor | float] | None = None
    after_step: Callable[[], None] | None = None
    #: a context every training step runs in (e.g. ``recompute.saving_inputs``)
    context: Callable[[], contextlib.AbstractContextManager] | None = None

    def step(self) -> Tensor:
        if self.kind == "infer":
            with torch.no_grad(), self._context():
                return self.model(input_ids=self.ids).logits
        with self._context():
            loss, total = self.forward()
            total.backward()
            self.finish()
        return loss  # the task loss (the sanity check compares first losses across methods)

    def _context(self) -> contextlib.AbstractContextManager:
        return self.context() if self.context is not None else contextlib.nullcontext()

    def forward(self) -> tuple[Tensor, Tensor]:
        """A training step's forward: (the task loss, the loss to back-propagate)."""
        if self.embeds is not None:
            self.embeds.grad = None
            loss = self.model(inputs_embeds=self.embeds, labels=self.ids).loss
            return loss, loss
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        return loss, (loss if self.extra_loss is None else loss + self.extra_loss())

    def finish(self) -> None:
        """A training step after its backward: the optimizer's step and the method's."""
        if self.optimizer is None:
            return
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step()
        self.optimizer.zero_grad(set_to_none=True)

    def kept_bytes(self) -> int:
        """Tensor storage one training forward leaves alive for its backward (exact, any
        device: ``TensorMemory``); the step is then completed without the optimizer's update."""
        with self._context(), TensorMemory() as mem:
            _, total = self.forward()
            kept = mem.current_bytes
            total.backward()
        self.model.zero_grad(set_to_none=True)
        return kept


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


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_runner(model: nn.Module, ids: Tensor) -> Runner:
    """fwd + bwd + AdamW on the parameters that require a gradient."""
    params = trainable_params(model)
    model.train()
    return Runner(model, ids, "train", optimizer=torch.optim.AdamW(params, lr=LR),
                  trainable=sum(p.numel() for p in params))


def floor_runner(base: nn.Module, ids: Tensor) -> Runner:
    """The frozen base's own fwd + bwd, the gradient flowing back into ``inputs_embeds``."""
    base.requires_grad_(False).train()
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
    return Runner(base, ids, "train", embeds=embeds.detach().requires_grad_(True))


def full_runner(base: nn.Module, ids: Tensor) -> Runner:
    """Full fine-tuning: every parameter trainable."""
    return train_runner(base.requires_grad_(True), ids)


def base_infer_runner(base: nn.Module, ids: Tensor) -> Runner:
    return Runner(base.requires_grad_(False).eval(), ids, "infer")


@torch.no_grad()
def perturb(model: nn.Module, seed: int, scale: float = 0.02, *, add: bool = False) -> None:
    """Give the trainable parameters non-zero values, the same ones in every process.

    ``add=False``: replace them by ``scale · N(0, 1)`` (LoRA: B starts at zero);
    ``add=True``: add that noise to their initial values (scaling vectors start at one).
    """
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            noise = scale * torch.randn(p.shape, generator=gen)
            if add:
                p.add_(noise.to(p))
            else:
                p.copy_(noise)


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    kind: str  # "train" | "infer"
    build: Callable[[nn.Module, Tensor], Runner]
    peer: str | None = None  # the peft case this deltatune case is compared to
    needs_peft: bool = False
    #: runs deltatune's fused kernels (``deltatune.kernels``): CUDA only
    needs_kernels: bool = False
    #: trains or rewrites the base model's own tensors (full fine-tuning, ``dt.merge``): never
    #: shares them with other cases (``--share-weights``)
    own_weights: bool = False


REFERENCE = {"train": "floor", "infer": "infer_base"}

DEFINITIONS = {
    "time": "seconds per step, one model per case, one step of every case per round in a "
            "shuffled order; spread_pct = (p75 - p25) / median",
    "memory.peak_bytes": "peak during one step (after warm-up) minus the baseline taken in a "
                         "fresh process after imports and a throw-away run on a tiny model; "
                         "CPU: resident set size, CUDA: max_memory_allocated",
    "memory.resident_before_step_bytes": "weights, optimizer state and inputs held between steps",
    "memory.step_increase_bytes": "peak minus resident: activations, gradients, temporaries",
    "memory.kept_bytes": "tensor storage a training forward leaves alive for its backward, "
                         "counted exactly (deltatune.train.memory.TensorMemory; not under "
                         "--compile): activations, without allocator caching",
    "ratios": "time: median / reference median; memory: peak / reference peak; reference = "
              "floor (training) or infer_base (inference); peer = the peft case",
    "sanity.minor_page_faults_per_step_median": "fresh 4 KiB pages the timing process took from "
                                                "the kernel during a step (CPU allocator churn)",
    "environment.malloc_timing": "the glibc malloc configuration of the timing process",
}

_SUITES: dict[str, Suite] = {}


@dataclass(frozen=True)
class Suite:
    """A benchmark: its cases and how it checks and reports them.

    Args:
        name: the benchmark's name (``"lora_speed"``): the JSON's ``benchmark`` and the stem of
            the result files, ``<name>_<device>.json`` / ``.md``.
        description: the script's docstring (its first paragraph is the ``--help`` summary).
        cases: every case, in report order; the references (``floor``, ``infer_base``) among
            them.
        check: called with every case's runner before timing; returns the sanity block
            (differences between cases that must compute the same thing).
        markdown: the report (the JSON's content) as Markdown.
        default_steps: measured steps per case without ``--steps``.
        definitions: JSON ``definitions`` added to the shared ones.
        annotate: called with the assembled report before it is written (extra fields).
        skipped: cases this run cannot offer, with the reason (``--cases`` names them).
    """

    name: str
    description: str
    cases: tuple[Case, ...]
    check: Callable[[dict[str, Runner]], dict[str, Any]]
    markdown: Callable[[dict[str, Any]], str]
    default_steps: int = 40
    definitions: Mapping[str, str] = field(default_factory=dict)
    annotate: Callable[[dict[str, Any]], None] | None = None
    skipped: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _SUITES[self.name] = self

    @property
    def by_name(self) -> dict[str, Case]:
        return {c.name: c for c in self.cases}


def apply_settings(s: Settings) -> None:
    """Process-wide settings of a run: threads, and the compiled partitioner's budget."""
    torch.set_num_threads(s.threads)
    if s.memory_budget is not None:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = s.memory_budget


def build_runner(case: Case, base: nn.Module | Shared, ids: Tensor, *,
                 compile: bool = False) -> Runner:
    torch.manual_seed(0)  # adapter initialisation: the same stream for every case
    shared = base if isinstance(base, Shared) else None
    runner = case.build(base if shared is None else shared.model, ids)
    if shared is not None:
        shared.verify()
    if compile:  # after injection: the compiled graph holds the adapted model
        runner.model = torch.compile(runner.model)
    return runner


def copy_for(base: nn.Module, case: Case, share: bool) -> nn.Module | Shared:
    """``base`` copied for ``case``: a deep copy, or with ``share`` (and unless the case owns
    its weights) a copy of the module tree holding the very tensors of ``base``, frozen."""
    if not share or case.own_weights:
        return copy.deepcopy(base)
    tensors = [*base.parameters(), *base.buffers()]
    base.requires_grad_(False)
    model = copy.deepcopy(base, memo={id(t): t for t in tensors})
    return Shared(case.name, tensors, model)


class Shared:
    """A model sharing ``tensors`` with other cases; ``build_runner`` checks afterwards that
    building the case neither unfroze nor rewrote one of them."""

    def __init__(self, name: str, tensors: list[Tensor], model: nn.Module) -> None:
        self.case, self.model = name, model
        self.versions = [(t, t._version) for t in tensors]

    def verify(self) -> None:
        for t, version in self.versions:
            if t.requires_grad or t._version != version:
                raise RuntimeError(
                    f"case {self.case!r} {'trains' if t.requires_grad else 'rewrites'} a base "
                    "tensor it shares with the other cases (--share-weights): declare it "
                    "Case(..., own_weights=True)")


# --------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
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


def time_cases(s: Settings, suite: Suite, cases: list[Case]
               ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Build every case, check that they compute the same thing, then time them interleaved."""
    base, ids = build_base(s), make_ids(s)
    runners = {c.name: build_runner(c, copy_for(base, c, s.share_weights), ids,
                                    compile=s.compile) for c in cases}
    del base
    sanity = suite.check(runners)
    bar = _progress((s.warmup + s.steps) * len(runners), "timing")
    for _ in range(s.warmup):
        for runner in runners.values():
            runner.step()
            bar.update()
    sync(s.device)
    times: dict[str, list[float]] = {name: [] for name in runners}
    faults: dict[str, list[int]] = {name: [] for name in runners}
    order, rng = list(runners), random.Random(s.seed)
    for _ in range(s.steps):
        rng.shuffle(order)  # a fixed order would give each case the same predecessor
        for name in order:
            sync(s.device)
            faults_before, start = _minor_faults(), time.perf_counter()
            runners[name].step()
            sync(s.device)
            times[name].append(time.perf_counter() - start)
            faults[name].append(_minor_faults() - faults_before)
            bar.update()
    bar.close()
    sanity["trainable_params"] = {n: r.trainable for n, r in runners.items() if r.kind == "train"}
    sanity["minor_page_faults_per_step_median"] = {n: statistics.median(f)
                                                   for n, f in faults.items()}
    return times, sanity


@torch.no_grad()
def rel(a: Tensor, b: Tensor) -> float:
    """Relative difference ‖a − b‖ / ‖b‖ (fp32)."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def first_losses(runners: dict[str, Runner]) -> dict[str, Any]:
    """One step of every training case: at initialisation every adapter is the identity, so
    every case starts from the same loss."""
    out: dict[str, Any] = {}
    losses = {n: float(r.step().detach()) for n, r in runners.items() if r.kind == "train"}
    if losses:
        first = next(iter(losses.values()))
        out["first_loss"] = losses
        out["first_loss_max_abs_diff"] = max(abs(v - first) for v in losses.values())
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
def _rss() -> int:
    value = proc_status("VmRSS")
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
    hwm, rss = proc_status("VmHWM"), proc_status("VmRSS")
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


def cache_malloc() -> bool:
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


def _prime(s: Settings, case: Case) -> None:
    """Run the case once on the tiny model and free it, before the baseline is taken.

    The first step loads what imports leave for later (transformers' lazy modules, the thread
    pool, oneDNN / cuBLAS state); without this, that one-off cost would count as the case's.
    """
    tiny = replace(s, **PRESETS["quick"])
    runner = build_runner(case, build_base(tiny), make_ids(tiny), compile=s.compile)
    for _ in range(2):
        runner.step()
    del runner
    gc.collect()
    sync(s.device)


def measure_memory(s: Settings, case: Case) -> dict[str, Any]:
    """In a fresh process: peak memory of one step of ``case`` over the import baseline."""
    apply_settings(s)
    cuda = s.device == "cuda"
    pinned = False if cuda else _pin_malloc()
    _prime(s, case)
    baseline = torch.cuda.memory_allocated() if cuda else _rss()
    runner = build_runner(case, build_base(s), make_ids(s), compile=s.compile)
    for _ in range(max(s.warmup, 1)):
        runner.step()
    # What building left unreachable but alive (a reference model in a reference cycle: a
    # delta holds its base layer) is freed before the peak counter starts, for every case.
    gc.collect()
    sync(s.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = runner.step()
        sync(s.device)
        peak, method = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    elif _reset_hwm():
        before = _rss()
        result = runner.step()
        peak, method = proc_status("VmHWM"), "vmhwm_reset_by_clear_refs"
    else:
        before = _rss()
        with _Sampler() as sampler:
            result = runner.step()
        peak, method = sampler.peak, "rss_sampled_every_0.5ms"
    del result
    out = {"peak_bytes": peak - baseline, "resident_before_step_bytes": before - baseline,
           "step_increase_bytes": peak - before, "baseline_bytes": baseline, "method": method,
           "malloc_pinned": pinned}
    if case.kind == "train" and not s.compile:  # a compiled graph runs under no dispatch mode
        out["kept_bytes"] = runner.kept_bytes()
    return out


def _memory_child(settings: dict[str, Any], suite: str, name: str, conn: Any) -> None:
    try:
        conn.send(measure_memory(Settings(**settings), _SUITES[suite].by_name[name]))
    except BaseException as exc:  # report, don't hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


_COMPUTED_IN_THIS_PROCESS = False  # fork is only safe before the parent ran torch kernels


def memory_cases(s: Settings, suite: Suite, cases: list[Case]
                 ) -> tuple[dict[str, dict[str, Any]], str]:
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
    if method == "fork":
        # The imports' objects go to the permanent generation: a child's gc.collect() (in
        # _prime) then skips them instead of walking, and copying on write, the whole heap.
        gc.collect()
        gc.freeze()
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_memory_child, args=(settings, suite.name, name, child))
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
    gc.unfreeze()
    return {c.name: out[c.name] for c in cases}, method


# --------------------------------------------------------------------------------- report
def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def assemble(s: Settings, suite: Suite, cases: list[Case], times: dict[str, list[float]],
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

    def peak(name: str, key: str = "peak_bytes") -> float | None:
        return results.get(name, {}).get("memory", {}).get(key)

    for name, entry in results.items():
        ref = REFERENCE[entry["kind"]]
        entry["ratios"] = {
            "reference": ref,
            "time_vs_reference": ratio(median(name), median(ref)),
            "memory_vs_reference": ratio(peak(name), peak(ref)),
            "kept_vs_reference": ratio(peak(name, "kept_bytes"), peak(ref, "kept_bytes")),
        }
        if entry["peer"] in results:
            peer = entry["peer"]
            entry["ratios"].update(
                time_vs_peer=ratio(median(name), median(peer)),
                memory_vs_peer=ratio(peak(name), peak(peer)),
                kept_vs_peer=ratio(peak(name, "kept_bytes"), peak(peer, "kept_bytes")))
    return {"benchmark": suite.name, "created": datetime.datetime.now().isoformat(
        timespec="seconds"), "environment": env, "settings": asdict(s),
        "definitions": {**DEFINITIONS, **suite.definitions}, "cases": results, "sanity": sanity}


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
        "load_avg_1m_end": load_avg(),
    }


def load_avg() -> float | None:
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
        # ":/src": the repository's src/, whatever the working directory (untracked files count)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":/src"], cwd=root,
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty-src" if dirty else "")


def fmt_load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def fmt_x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def fmt_mib(value: int | None) -> str:
    return "—" if value is None else f"{value / _MIB:,.1f}"


def header_lines(report: dict[str, Any], title: str, note: str) -> list[str]:
    """The Markdown title and the paragraph on the setup: versions, shapes, steps, load.

    ``note`` opens the paragraph's third line (the methods' hyper-parameters).
    """
    env, s = report["environment"], report["settings"]
    return [
        f"# {title} — {env['device']} ({env['device_name']})"
        + (", torch.compile" if s.get("compile") else "")
        + (f" (activation memory budget {s['memory_budget']})"
           if s.get("memory_budget") is not None else ""),
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"deltatune {env['deltatune']} ({env['git']}); {s['dtype']}, torch threads: "
        f"{env['threads']} (CPU cores: {env['cpu_count']}).  ",
        f"Llama: hidden {s['hidden']}, intermediate {s['intermediate']}, {s['layers']} layers, "
        f"{s['heads']} heads, vocab {s['vocab']}; batch {s['batch']} × seq {s['seq']}; "
        f"{s['warmup']} warm-up + {s['steps']} measured steps per case, interleaved (shuffled "
        f"rounds){'; the cases share the frozen base weights' if s.get('share_weights') else ''}"
        f"; malloc: {env.get('malloc_timing', 'default')}.  ",
        f"{note} Times: median (min, IQR spread); memory: peak during one step "
        "minus the post-import baseline, each case in a fresh process"
        + ("; kept: the tensor storage a training forward leaves alive for its backward, "
           "counted exactly (`TensorMemory`)" if any(
               "kept_bytes" in c["memory"] for c in report["cases"].values()) else "")
        + ".  ",
        f"1-minute load average: {fmt_load(env['load_avg_1m_start'])} at the start, "
        f"{fmt_load(env['load_avg_1m_end'])} at the end (this run adds about the thread "
        f"count); {report['created']}.",
    ]


#: An extra table column: header, alignment row cell, the cell of one case.
Column = tuple[str, str, Callable[[dict[str, Any]], str]]

TABLES = (("train", "Training step (fwd + bwd + AdamW)", "floor"),
          ("infer", "Inference (no_grad forward)", "base"))


#: What a training forward keeps for backward (exact): MiB, × the floor, vs peft.
KEPT_COLUMNS: tuple[Column, ...] = (
    ("kept MiB", "---:", lambda c: fmt_mib(c["memory"].get("kept_bytes"))),
    ("kept × floor", "---:", lambda c: fmt_x(c["ratios"].get("kept_vs_reference"))),
    ("kept vs peft", "---:", lambda c: fmt_x(c["ratios"].get("kept_vs_peer"))),
)


def table_lines(report: dict[str, Any], kind: str, title: str, ref: str,
                extra: Sequence[Column] = ()) -> list[str]:
    """One results table (a ``## title`` section) for the cases of ``kind``; ``[]`` if none."""
    rows = {n: c for n, c in report["cases"].items() if c["kind"] == kind}
    if not rows:
        return []
    if any("kept_bytes" in c["memory"] for c in rows.values()):
        extra = (*KEPT_COLUMNS, *extra)
    lines = ["", f"## {title}", "",
             f"| case | median ms | min ms | spread | time × {ref} | time vs peft "
             f"| peak MiB | mem × {ref} | mem vs peft |"
             + "".join(f" {head} |" for head, _, _ in extra),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
             + "".join(f"{align}|" for _, align, _ in extra)]
    for c in rows.values():
        t, r, m = c["time"], c["ratios"], c["memory"]
        lines.append(
            f"| {c['label']} | {t['median_s'] * 1e3:,.1f} | {t['min_s'] * 1e3:,.1f} | "
            f"{t['spread_pct']:.1f}% | {fmt_x(r['time_vs_reference'])} | "
            f"{fmt_x(r.get('time_vs_peer'))} | {fmt_mib(m.get('peak_bytes'))} | "
            f"{fmt_x(r['memory_vs_reference'])} | {fmt_x(r.get('memory_vs_peer'))} |"
            + "".join(f" {cell(c)} |" for _, _, cell in extra))
    return lines


def memory_error_lines(report: dict[str, Any]) -> list[str]:
    errors = {n: c["memory"]["error"] for n, c in report["cases"].items()
              if "error" in c["memory"]}
    return ["", f"Memory errors: {errors}"] if errors else []


# --------------------------------------------------------------------------------- main
def parse_args(suite: Suite, argv: list[str] | None = None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(description=suite.description.split("\n\n")[0],
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
    p.add_argument("--steps", type=int,
                   help=f"measured steps per case (default {suite.default_steps}; quick 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--compile", action="store_true",
                   help="run every case under torch.compile (ratios against the compiled floor)")
    p.add_argument("--activation-memory-budget", type=float, metavar="FRACTION",
                   help="with --compile: torch._functorch.config.activation_memory_budget for "
                        "every case (the partitioner recomputes to save activations)")
    p.add_argument("--malloc", choices=["cached", "default"], default="cached",
                   help="CPU timing: configure glibc malloc to cache freed memory (default; no "
                        "page faults after warm-up) or leave its defaults")
    p.add_argument("--share-weights", choices=["auto", "yes", "no"], default="auto",
                   help="timing: the cases share the frozen base's tensors instead of one copy "
                        "each (auto: on CUDA, where an 8B model's copies would not fit)")
    order = [c.name for c in suite.cases]
    p.add_argument("--cases", help=f"comma-separated subset of {order}")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output directory ({RESULTS})")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    preset = a.preset or ("quick" if a.quick else "gpu" if a.device == "cuda" else "cpu")
    shape = {k: getattr(a, k) if getattr(a, k) is not None else v
             for k, v in PRESETS[preset].items()}
    names = tuple(order) if a.cases is None else tuple(a.cases.split(","))
    unavailable = {n: suite.skipped[n] for n in names if n in suite.skipped}
    if unavailable:
        p.error(f"cases not available in this run: {unavailable}")
    unknown = [n for n in names if n not in suite.by_name]
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {order}")
    if peft is None:
        names = tuple(n for n in names if not suite.by_name[n].needs_peft)
    if a.device != "cuda" or a.compile:  # under torch.compile, the compiler fuses
        fused = [n for n in names if suite.by_name[n].needs_kernels]
        if fused and a.cases is not None:
            p.error(f"cases {fused} run deltatune's fused kernels, which need --device cuda "
                    "and no --compile")
        names = tuple(n for n in names if n not in fused)
    settings = Settings(
        device=a.device, dtype=a.dtype or ("bfloat16" if a.device == "cuda" else "float32"),
        preset=preset, warmup=a.warmup if a.warmup is not None else (1 if a.quick else 2),
        steps=a.steps if a.steps is not None else (3 if a.quick else suite.default_steps),
        seed=a.seed, threads=a.threads or torch.get_num_threads(), memory=not a.no_memory,
        malloc=a.malloc, cases=names, compile=a.compile,
        memory_budget=a.activation_memory_budget,
        share_weights=(a.share_weights == "yes"
                       or (a.share_weights == "auto" and a.device == "cuda")), **shape)
    if settings.steps < 1 or settings.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    budget = settings.memory_budget
    if budget is not None and not (settings.compile and 0.0 <= budget <= 1.0):
        p.error("--activation-memory-budget takes a fraction in [0, 1] and needs --compile")
    return settings, a.out


def select_cases(suite: Suite, names: Sequence[str]) -> list[Case]:
    """The named cases plus the references every ratio needs, in the suite's order."""
    by_name = suite.by_name
    wanted = set(names) | {REFERENCE[by_name[n].kind] for n in names}
    return [c for c in suite.cases if c.name in wanted]


def main(suite: Suite, argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, measure memory (children first), time, write JSON + Markdown."""
    global _COMPUTED_IN_THIS_PROCESS
    s, out = parse_args(suite, argv)
    apply_settings(s)
    cases = select_cases(suite, s.cases)
    s = replace(s, cases=tuple(c.name for c in cases))
    load = load_avg()
    if load is not None and s.device == "cpu" and load > 0.5:
        print(f"warning: 1-minute load average {load:.2f} before starting; other processes "
              "will add noise to the CPU timings", file=sys.stderr)
    clock = time.perf_counter()
    memory, start = memory_cases(s, suite, cases) if s.memory else ({}, None)
    _COMPUTED_IN_THIS_PROCESS = True
    wall = {"memory_s": time.perf_counter() - clock}
    malloc = "default"
    if s.device == "cpu" and s.malloc == "cached":
        malloc = ("glibc caching: M_MMAP_MAX=0, no trim" if cache_malloc()
                  else "default (caching requested; not glibc)")
    times, sanity = time_cases(s, suite, cases)
    wall["timing_s"] = time.perf_counter() - clock - wall["memory_s"]
    report = assemble(s, suite, cases, times, memory, sanity, environment(s, start, load))
    report["environment"]["malloc_timing"] = malloc
    report["wall"] = wall
    if suite.annotate is not None:
        suite.annotate(report)
    out.mkdir(parents=True, exist_ok=True)
    budget = "" if s.memory_budget is None else f"_budget{s.memory_budget:g}"
    stem = out / f"{suite.name}_{s.device}{'_compiled' if s.compile else ''}{budget}"
    stem.with_name(stem.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
    table = suite.markdown(report)
    stem.with_name(stem.name + ".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md")
    return report
