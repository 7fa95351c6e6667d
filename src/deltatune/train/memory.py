"""Peak memory of a stretch of training, over what was resident when it began.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU (Linux): the kernel's peak
resident set (``VmHWM``), reset through ``/proc/self/clear_refs`` after glibc has returned its
free memory (``malloc_trim``); elsewhere, the resident size sampled from a thread. In-process
CPU figures are approximate (freed memory the allocator keeps can be reused unseen), so they
compare runs of one process, not processes. ``TensorMemory`` counts tensor storage instead:
exact on any device, for comparing what two computations keep.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import threading
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def proc_status(key: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM`` …); ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss() -> int | None:
    return proc_status("VmRSS")


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = proc_status("VmHWM"), _rss()
    return hwm is not None and rss is not None and hwm <= rss + 4 * 2**20


class PeakMemory:
    """``with PeakMemory(device) as m: …`` then ``m.peak_bytes`` (``None`` if unknown) and
    ``m.method`` (how it was measured)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.method = "unavailable"
        self._base = 0
        self._hwm = False
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        _trim()
        base = _rss()
        if base is None:
            return self
        self._base = base
        if _reset_hwm():
            self._hwm, self.method = True, "peak resident set (VmHWM)"
        else:
            self._sampled, self.method = base, "resident set sampled every 2 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, _rss() or 0)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._hwm:
            self.peak_bytes = max(0, (proc_status("VmHWM") or self._base) - self._base)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(0, max(self._sampled, _rss() or 0) - self._base)


def _storage(t: Any) -> torch.UntypedStorage | None:
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return None


class TensorMemory(TorchDispatchMode):
    """Tensor storage allocated by the operators run inside the context: ``current_bytes``
    still alive and ``peak_bytes``, on any device.

    Exact and repeatable where ``PeakMemory`` is not (no allocator caching, no other use of
    the process): every new storage an operator returns is counted (not views or in-place
    results, which share an input's) until Python frees it. What a step keeps for backward is
    ``current_bytes`` after the forward. Storage made before the context (weights, inputs) is
    not counted; the operators of a backward run on another thread (CUDA) are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, weakref.ref] = {}
        self._lock = threading.Lock()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(s) for s in map(_storage, tree_leaves((args, kwargs))) if s is not None}
        for t in tree_leaves(out):
            storage = _storage(t)
            if storage is not None and id(storage) not in inputs:  # not a view, not in place
                self._track(storage)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._live:
            return
        size = storage.nbytes()
        with self._lock:
            self._live[key] = weakref.ref(storage, functools.partial(self._free, key, size))
            self.current_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _free(self, key: int, size: int, _ref: Any) -> None:
        with self._lock:
            if self._live.pop(key, None) is not None:
                self.current_bytes -= size


__all__ = ["PeakMemory", "TensorMemory", "proc_status"]
