"""One model called from several threads at once (a server answering requests concurrently).

A call's own state lives in the call: the forward plans of the layers are read-only during
plain calls, so any number of them run together. Three things are per call and need care:

* the stacks that pair a forward's pre-hook with its post-hook (tokens-form deltas, per-sample
  calls): thread-local (``CallStack``), so the hooks of concurrent calls do not pop each
  other's entries;
* a per-sample call (``adapter_names=`` / ``per_sample``) rewrites every wrapped layer's plan
  for its duration: it runs alone (``Access.exclusive``), while plain calls share
  (``Access.shared``) — a plain call waits for another thread's per-sample call to end, and the
  other way round;
* deltas that carry state from one module's hook to another within a call (side networks fed
  by the blocks' inputs, parallel adapters reading a sub-layer's input): a model holding one
  runs every call alone.

Both helpers survive ``copy.deepcopy`` and pickling of the model (a copy gets fresh ones).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from .errors import StateError


class CallStack(threading.local):
    """A stack per thread (``items``)."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def __reduce__(self) -> tuple:
        return CallStack, ()


class Access:
    """Plain calls share the model; a call that changes the layers' plans has it alone.

    A thread inside its own exclusive call passes through ``shared`` (``generate`` calls the
    model repeatedly inside a ``per_sample`` context). Waiting exclusive calls go first: plain
    calls arriving meanwhile wait, so a stream of them cannot starve a per-sample request.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers: Counter[int] = Counter()
        self._writer: int | None = None
        self._waiting = 0

    def __reduce__(self) -> tuple:
        return Access, ()

    def shared(self) -> bool:
        """Enter a plain call; returns whether it counts (``False`` within this thread's own
        exclusive call, which it is part of). Pair a counted entry with ``release_shared``."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                return False
            while self._writer is not None or (self._waiting and not self._readers[me]):
                self._cond.wait()
            self._readers[me] += 1
            return True

    def release_shared(self) -> None:
        me = threading.get_ident()
        with self._cond:
            self._readers[me] -= 1
            if self._readers[me] <= 0:
                del self._readers[me]
            if not self._readers:
                self._cond.notify_all()

    def exclusive(self, what: str) -> None:
        """Enter a call that changes the layers' plans (``what`` names it in errors). Refused
        inside this thread's own calls of the model: it would wait for itself."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                raise StateError(f"{what} is already open on this model in this thread; close "
                                 "it first (per_sample contexts and adapter_names= do not nest)")
            if self._readers[me]:
                raise StateError(f"{what} inside a call of the same model in the same thread "
                                 "(a forward calling the model again with adapter_names=); "
                                 "choose the rows' adapters at the outer call")
            self._waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer = me

    def alone(self, what: str) -> bool:
        """``exclusive``, passing through within this thread's own exclusive call; returns
        whether it counts (pair a counted entry with ``release_exclusive``)."""
        if self._writer == threading.get_ident():
            return False
        self.exclusive(what)
        return True

    def release_exclusive(self) -> None:
        with self._cond:
            self._writer = None
            self._cond.notify_all()


__all__ = ["Access", "CallStack"]
