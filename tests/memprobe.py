"""Peak memory of one reader call, for the hostile-file tests and the fuzzer.

Used inside a child process (after its imports), around each case::

    with Peak(budget) as peak:
        load(path)
    peak.bytes, peak.over  # the case's own peak rise; whether it passed ``budget``

Three views, because no single one sees everything:

- ``tracemalloc`` sees Python objects and numpy arrays (numpy reports its buffers to it) at
  their allocated size, touched or not; its peak is reset per case.
- the resident-set high-water mark (``VmHWM``) sees torch's CPU allocations, which
  tracemalloc does not; Linux resets it per case through ``/proc/self/clear_refs`` (``5``),
  so it is this case's peak, not the process's since start (``ru_maxrss`` never goes down).
  Free heap memory is handed back first and glibc's mmap threshold fixed, so that a new
  block is new resident memory rather than reused resident heap.
- ``RLIMIT_AS`` caps the address space at the case's start plus ``budget``: an allocation
  beyond the budget fails at once (even one never touched, which the resident set misses)
  and that failure is reported as ``over``, also when a reader wraps it in its own error.
"""

from __future__ import annotations

import ctypes
import re
import resource
import tracemalloc

MB = 1 << 20


def _status(key: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (None where there is no procfs)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _fresh_heap() -> None:
    """Make new allocations show in the resident set: hand free heap memory back to the
    system (``malloc_trim``) and fix glibc's mmap threshold at 128 KiB (it otherwise rises
    up to 32 MiB after frees, so big blocks come from already-resident heap)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _alloc_failure(exc: BaseException | None) -> bool:
    """Whether ``exc`` or anything it was raised from is a failed allocation."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if isinstance(exc, MemoryError) or (
            isinstance(exc, RuntimeError)
            and ("can't allocate memory" in text or "out of memory" in text)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Peak:
    """Measure (and cap) the memory one block allocates above its start; see the module."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.traced = 0
        self.resident: int | None = None
        self.hit_limit = False

    def __enter__(self) -> Peak:
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._traced0 = tracemalloc.get_traced_memory()[0]
        _fresh_heap()
        self._hwm = _reset_hwm()
        self._rss0 = _status("VmRSS")
        self._limits = resource.getrlimit(resource.RLIMIT_AS)
        vm = _status("VmSize")
        if vm is not None:
            soft = vm + self.budget
            hard = self._limits[1]
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        resource.setrlimit(resource.RLIMIT_AS, self._limits)
        self.traced = tracemalloc.get_traced_memory()[1] - self._traced0
        if self._hwm and self._rss0 is not None:
            self.resident = (_status("VmHWM") or 0) - self._rss0
        self.hit_limit = _alloc_failure(exc)
        return False

    def note(self, exc: BaseException) -> None:
        """Record an exception the caller caught inside the block (to see wrapped failures)."""
        self.hit_limit = self.hit_limit or _alloc_failure(exc)

    @property
    def bytes(self) -> int:
        """The case's peak rise: the larger of the traced and the resident view."""
        return max(self.traced, self.resident or 0)

    @property
    def over(self) -> bool:
        """Whether the case needed more than its budget."""
        return self.hit_limit or self.bytes >= self.budget
