"""How the CPU's cores are shared among the SAEs of a sweep.

torch runs each operation on a team of threads (`torch.get_num_threads()`). On the CPU a TopK SAE's
step is a dense product followed by many short operations (the top-k selection, the regrouping of
the active entries, sums over them): the team meets at the end of each, and its threads keep
spinning on their cores for a while after it, where the next operation's own threads (the
selection's) want to run. With several SAEs to step on the same batch there is a better split:
each core steps whole SAEs, one after another, with torch at one thread, so that nothing waits
for a team and no thread spins.

Where an SAE's step runs does not change a bit of its result: each operation of a step gives the
same bits at one thread as at several (tests/test_threads.py checks every architecture both ways)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from ..common.pools import kept_pool

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch at one thread inside the block (the thread count is restored after it)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _workers(n: int) -> ThreadPoolExecutor:
    """A pool of n threads, kept between calls. They run work only while torch is at one thread
    (each_on_cores), and a thread's torch takes the count in force at its first operation: one."""
    return kept_pool("sae", n)


# Spreading pays where the items fill the threads evenly enough: the dearest-first schedule must end
# within this factor of a perfect split. torch's own team of two threads ran a step of the eight SAEs
# of bench-sweep4096 only 1.25x faster than one thread (1.6x the perfect split's time), so one SAE
# far dearer than the rest, or fewer SAEs than threads, is left to torch's team.
BALANCE = 1.5


def spread_pays(costs: Sequence[float], threads: int) -> bool:
    """Whether items of these costs, the dearest first to whichever of `threads` threads is free,
    finish within BALANCE of sum(costs) / threads."""
    if threads < 2 or len(costs) < 2:
        return False
    load = [0.0] * threads
    for c in sorted(costs, reverse=True):
        load[load.index(min(load))] += c
    return max(load) <= BALANCE * sum(costs) / threads


def each_on_cores(fn: Callable[[T], R], items: Sequence[T], device: torch.device,
                  cost: Callable[[T], float] | None = None) -> list[R]:
    """[fn(item) for item in items], the items spread over torch's threads on a CPU: each thread takes
    the next item (the dearest first, by `cost`; all alike without it) and runs it with torch at one
    thread. One after another, as torch would, on other devices, with one thread, or where the items
    do not fill the threads evenly (`spread_pays`).

    The items must not share state that fn changes. An exception raised by any item's fn is raised
    here (the first in the items' order) once every started item has finished; items not started
    yet are not run."""
    threads = torch.get_num_threads()
    costs = [float(cost(item)) if cost else 1.0 for item in items]
    if device.type != "cpu" or not spread_pays(costs, threads):
        return [fn(item) for item in items]
    n = min(threads, len(items))
    order = sorted(range(len(items)), key=lambda i: -costs[i])
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in order:
        todo.put(i)
    results: list = [None] * len(items)
    errors: dict[int, BaseException] = {}
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # noqa: BLE001  (re-raised by the caller, below)
                errors[i] = e
                stop.set()

    with one_torch_thread():
        futures = [_workers(n - 1).submit(work) for _ in range(n - 1)]
        try:
            work()
        finally:
            try:  # the others finish the items they hold, whatever stopped this thread
                for f in futures:
                    f.result()
            except BaseException:
                stop.set()
                raise
    if errors:
        raise errors[min(errors)]
    return results
