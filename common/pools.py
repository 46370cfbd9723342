"""Thread pools kept for the life of the process, one per name: the compiled kernels' helpers
(common/sparse_kernels.py) and the threads that step a sweep's SAEs side by side (train/threads.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()
_pools: dict[str, tuple[int, ThreadPoolExecutor]] = {}


def kept_pool(name: str, n: int) -> ThreadPoolExecutor:
    """The pool `name` with n threads (the one from an earlier call while n is unchanged; a new one,
    the old one shut down after its work, when n changes). Its threads are named actcache-<name>."""
    with _lock:
        size, pool = _pools.get(name, (0, None))
        if pool is None or size != n:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = ThreadPoolExecutor(n, thread_name_prefix=f"actcache-{name}")
            _pools[name] = (n, pool)
        return pool
