"""Where the engine's threads spend their time: a stack-sampling profiler for the stage threads.

cProfile sees only the thread that starts it, and the engine's work runs on its stage threads (decode,
prefill, transfer, output). This samples every thread's Python stack each ``interval`` seconds while
active and counts, per thread, the functions on the stack (inclusive) and the line at the top (leaf). A
leaf that is a call into JAX (``_value``, ``batched_device_put``, a compiled program's ``__call__``) is time
in C++ under that call: a blocking copy, an upload, a dispatch and its kernel launches.

Used by ``tools/bench_engine.py overhead --profile-host``.
"""

from __future__ import annotations

import collections
import sys
import threading
import time

_THREAD_START = {"_bootstrap", "_bootstrap_inner", "run"}  # on every thread's stack: not worth a line


class ThreadSampler:
    """Samples the stacks of every thread but its own, between ``start`` and ``stop``."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.samples: collections.Counter[str] = collections.Counter()  # thread -> samples taken
        self.inclusive: collections.Counter[tuple[str, str]] = collections.Counter()
        self.leaf: collections.Counter[tuple[str, str]] = collections.Counter()
        self._active = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-profile", daemon=True)
        self._thread.start()

    def start(self) -> None:
        self._active.set()

    def stop(self) -> None:
        self._active.clear()

    def _run(self) -> None:
        own = threading.get_ident()
        while True:
            time.sleep(self.interval)
            if not self._active.is_set():
                continue
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == own:
                    continue
                name = names.get(ident, str(ident))
                self.samples[name] += 1
                self.leaf[name, f"{_where(frame)}:{frame.f_lineno}"] += 1
                seen = set()
                while frame is not None:
                    if frame.f_code.co_name not in _THREAD_START:
                        seen.add(_where(frame))
                    frame = frame.f_back
                for where in seen:
                    self.inclusive[name, where] += 1

    def report(self, threads: list[str] | None = None, top: int = 12) -> str:
        """Per thread (those named, else all that were sampled), the top functions as a share of samples."""
        lines = []
        for name in threads or sorted(self.samples):
            total = self.samples[name]
            if not total:
                continue
            lines.append(f"thread {name} ({total} samples)")
            for title, counter in (("inclusive", self.inclusive), ("leaf", self.leaf)):
                rows = sorted(((n, where) for (thread, where), n in counter.items() if thread == name),
                              reverse=True)[:top]
                lines.append(f"  {title}:")
                lines += [f"    {n / total:6.1%}  {where}" for n, where in rows]
        return "\n".join(lines)


def _where(frame) -> str:
    code = frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"
