"""Where trials run: one interface, a local process pool by default, Ray when asked.

    with make_executor(workers=2, ray=None) as ex:          # local processes
        for index, result in ex.map(fn, state, jobs): ...   # as they finish
    make_executor(ray="auto")                              # a local Ray cluster
    make_executor(ray="ray://head:10001")                  # an existing cluster

``fn(state, job)`` must be a module-level function; ``state`` (the model, the data) is sent
to each worker once (the pool's initializer; ``ray.put`` on Ray), each ``job`` with its call.
Workers run PyTorch on one thread, so a trial's result does not depend on where it ran:
the same search gives the same trials in-process, on the pool and on Ray. ``workers=0``
runs in this process (tests, debugging).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from edgeslim.core.errors import ConfigError

Fn = Callable[[Any, Any], Any]

_STATE: Any = None  # a pool worker's copy of the shared state


class Executor(Protocol):
    """Runs ``fn(state, job)`` for every job; yields ``(index, result)`` as each finishes."""

    name: str

    def map(self, fn: Fn, state: Any, jobs: list[Any]) -> Iterator[tuple[int, Any]]: ...

    def close(self) -> None: ...


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


class InProcess:
    """Jobs run one after another in this process (``workers=0``)."""

    name = "in-process"

    def map(self, fn: Fn, state: Any, jobs: list[Any]) -> Iterator[tuple[int, Any]]:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i, job in enumerate(jobs):
                yield i, fn(state, job)
        finally:
            torch.set_num_threads(before)

    def close(self) -> None:
        pass


def _init_worker(state: Any) -> None:
    global _STATE
    _one_thread()
    _STATE = state


def _call(fn: Fn, job: Any) -> Any:
    return fn(_STATE, job)


class LocalPool:
    """A pool of ``workers`` spawned processes; the state is sent once, when they start."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.name = f"process pool ({workers} workers)"
        self._pool: cf.ProcessPoolExecutor | None = None
        self._state_id: int | None = None

    def _start(self, state: Any) -> cf.ProcessPoolExecutor:
        if self._pool is None or self._state_id != id(state):
            self.close()
            self._pool = cf.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(state,),
            )
            self._state_id = id(state)
        return self._pool

    def map(self, fn: Fn, state: Any, jobs: list[Any]) -> Iterator[tuple[int, Any]]:
        pool = self._start(state)
        futures = {pool.submit(_call, fn, job): i for i, job in enumerate(jobs)}
        try:
            for fut in cf.as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _ray_call(fn: Fn, state: Any, job: Any) -> Any:
    _one_thread()
    return fn(state, job)


class RayExecutor:
    """Jobs as Ray tasks (one CPU each) on a local cluster (``"auto"``) or at an address."""

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("ray= needs the optional extra: pip install 'edgeslim[ray]'") from exc
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address == "auto":
                # a local cluster started here (Ray's "auto" would require a running one)
                kwargs["num_cpus"] = os.cpu_count() or 1
            else:
                kwargs["address"] = address
            ray.init(**kwargs)
        self.name = f"ray ({address})"
        self._remote = ray.remote(num_cpus=1)(_ray_call)
        self._refs: dict[int, Any] = {}

    def map(self, fn: Fn, state: Any, jobs: list[Any]) -> Iterator[tuple[int, Any]]:
        ray = self.ray
        if id(state) not in self._refs:
            self._refs = {id(state): ray.put(state)}
        ref = self._refs[id(state)]
        futures = {self._remote.remote(fn, ref, job): i for i, job in enumerate(jobs)}
        waiting = list(futures)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for fut in done:
                yield futures[fut], ray.get(fut)

    def close(self) -> None:
        self._refs = {}
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def make_executor(workers: int | None = None, ray: str | None = None) -> Executor:
    """Ray when ``ray`` is ``"auto"`` or an address; else a local pool of ``workers``
    processes (default: the CPU count, at most 4); ``workers=0``: in this process."""
    if ray:
        return RayExecutor(ray)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    return InProcess() if workers == 0 else LocalPool(workers)
