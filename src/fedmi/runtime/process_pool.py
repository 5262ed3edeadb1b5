"""Process-pool runtime: the sites of a round train in parallel worker processes, one core each.

For models too heavy to vectorise across sites. The workers start once and serve every round.
They get the model and the sites' data at start-up (inherited through fork on Linux; the data
sits in shared memory, so it is never copied per round). Each round only the global parameters,
the method, the round info, site names and those sites' states go out, and only `Update`s and the
sites' new states come back (the states stay on the sites' side of the runtime).

Every site runs `train_site`, the sequential runtime's own loop, with the same batches, and
updates are yielded in the order of the requested sites, so a run matches the sequential one.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator, Sequence

import torch
import torch.multiprocessing as tmp
from torch import nn

from fedmi.core import params as P
from fedmi.core.local import LocalMethod, State
from fedmi.core.runtime import RUNTIMES
from fedmi.core.tasks import Task
from fedmi.core.types import RoundInfo, SiteData, Update
from fedmi.errors import FedmiError, one_line
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.core.site_loop import train_site

log = logging.getLogger("fedmi")

# Several chunks per worker so that a worker that draws large sites does not hold up the round.
_CHUNKS_PER_WORKER = 4

# Worker-side state, set once by `_init_worker` in each worker process.
_model: nn.Module | None = None
_task: Task | None = None
_sites: dict[str, SiteData] = {}
_index: dict[str, int] = {}


def _init_worker(model: nn.Module, task: Task, sites: Sequence[SiteData]) -> None:
    global _model, _task, _sites, _index
    torch.set_num_threads(1)  # one core per worker: the pool itself supplies the parallelism
    # A private copy: the model's storage may be shared memory (spawn passes it that way, or the
    # caller shared it), and workers training one shared set of weights would race.
    _model = copy.deepcopy(model)
    _task = task
    _sites = {s.name: s for s in sites}
    _index = {s.name: i for i, s in enumerate(sites)}


def _train_chunk(method: LocalMethod, params: P.ParamsT, names: Sequence[str], states: list[State | None],
                 round_info: RoundInfo) -> tuple[int, list[tuple[Update, State | None]]]:
    return os.getpid(), [train_site(method, _model, _task, _sites[name], params, state, round_info, _index[name])
                         for name, state in zip(names, states)]


def _chunks(names: Sequence[str], count: int) -> list[list[str]]:
    """`names` cut into `count` contiguous runs whose lengths differ by at most one."""
    size, extra = divmod(len(names), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        out.append(list(names[start:end]))
        start = end
    return out


class ProcessPoolRuntime(SequentialRuntime):
    """Sites train in `workers` processes (default: one per core); evaluation runs in this process.

    Use it as a context manager, or call `close()`, to stop the workers. A closed runtime can
    still evaluate but refuses to train. Note that the sites' tensors are moved to shared memory.
    """

    def __init__(self, model: nn.Module, sites: Sequence[SiteData], task: Task | None = None,
                 workers: int | None = None):
        if workers is None:
            workers = os.cpu_count() or 1
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise FedmiError(f"process pool: workers must be a positive integer, got {workers!r}")
        super().__init__(model, sites, task)
        self._site_list = list(sites)
        # More workers than sites would idle; more than a few per core would only contend.
        usable = max(1, min(len(self._site_list), 4 * (os.cpu_count() or 1)))
        if workers > usable:
            log.info("process pool: %d workers asked for, %d started (%d sites, %d cores)", workers, usable,
                     len(self._site_list), os.cpu_count() or 1)
        self._workers = min(workers, usable)
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False
        self._pids: set[int] = set()
        # Workers map these pages instead of receiving copies (fork would share them too, but
        # only until a write; spawn would otherwise pickle the whole dataset into every worker).
        for s in self._site_list:
            for t in (s.x_train, s.y_train, s.x_test, s.y_test):
                t.share_memory_()

    @property
    def workers(self) -> int:
        return self._workers

    @property
    def worker_pids(self) -> frozenset[int]:
        """Process ids of the workers that have trained sites so far."""
        return frozenset(self._pids)

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # Fork hands the model and the data to the workers without pickling; elsewhere fork
            # is unavailable or unsafe, and spawn passes the shared tensors by handle.
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self._executor = ProcessPoolExecutor(
                max_workers=self._workers, mp_context=tmp.get_context(method),
                # A copy, so that spawn's pickling does not move the caller's weights to shared memory.
                initializer=_init_worker, initargs=(copy.deepcopy(self._model), self.task, self._site_list),
            )
        return self._executor

    def start(self) -> None:
        """Start the workers now rather than in the first round (they fork at the first task)."""
        if self._closed:
            raise FedmiError("process pool runtime is closed; create a new one to train again")
        self._pool().submit(os.getpid).result()

    def train(self, method: LocalMethod, params: P.ParamsT, sites: Sequence[str],
              round_info: RoundInfo) -> Iterator[Update]:
        if self._closed:
            raise FedmiError("process pool runtime is closed; create a new one to train again")
        names = list(sites)
        for name in names:
            self._site(name)
        if not names:
            return iter(())
        # One shared copy per round: each chunk then carries handles, not the weights themselves.
        shared = P.clone(params)
        for v in shared.values():
            v.share_memory_()
        pool = self._pool()
        chunks = _chunks(names, min(len(names), self._workers * _CHUNKS_PER_WORKER))
        futures = [pool.submit(_train_chunk, method, shared, chunk, [self.site_states.get(n) for n in chunk],
                               round_info) for chunk in chunks]
        return self._collect(pool, chunks, futures)

    def _collect(self, pool: ProcessPoolExecutor, chunks: list[list[str]],
                 futures: list[Future]) -> Iterator[Update]:
        try:
            for chunk, future in zip(chunks, futures):
                try:
                    pid, updates = future.result()
                except BrokenProcessPool as e:
                    # A dead worker breaks the whole pool: drop it so the next round starts afresh.
                    if self._executor is pool:
                        self._executor = None
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise FedmiError(f"process pool: a worker process died; site(s) {', '.join(chunk)} "
                                     f"did not finish: {one_line(e)}") from e
                except Exception as e:
                    raise FedmiError(f"process pool: training failed at site(s) "
                                     f"{', '.join(chunk)}: {one_line(e)}") from e
                self._pids.add(pid)
                for update, kept in updates:
                    self.site_states.put(update.site, kept)
                    yield update
        finally:
            # The consumer stopped early or a chunk failed: drop the work that has not started.
            for future in futures:
                future.cancel()

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> ProcessPoolRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@RUNTIMES.register("processes")
def _make(model: nn.Module, sites: Sequence[SiteData], task: Task | None, workers: int | None) -> ProcessPoolRuntime:
    return ProcessPoolRuntime(model, sites, task, workers=workers)
