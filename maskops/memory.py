"""The CPU buffer cache behind maskops' large CPU outputs and workspaces.

A new multi-megabyte CPU buffer is mapped page by page as it is first written; for a
64 MB mask image that costs more than pasting the masks. So the CPU kernels take buffers of
1 MiB and more from a cache: memory freed by their tensors is kept (up to a limit) and given
to the next request of a similar size, and new buffers of 32 MiB and more are mapped with
transparent huge pages where the system allows it. The tensors are ordinary CPU tensors;
only their memory returns here when they are freed.

The limit on kept memory is ``MASKOPS_CPU_CACHE_MB`` (read when the cache is first used, by
an op or by a function here; default 256, ``0`` keeps nothing; an unusable value warns and
keeps the default) or ``set_cpu_cache_limit()``; the oldest kept blocks are dropped first.
``empty_cache()`` gives kept memory back to the system. A forked process (a DataLoader
worker) starts with an empty cache. Memory handed out by the cache shows in
``torch.profiler`` memory profiles like torch's own allocations.

Where transparent huge pages are set to ``madvise`` with ``defrag=madvise``, the kernel may
compact memory to find a huge page for a new block (a one-off stall when memory is
fragmented). Keep the cache warm, set the system's ``defrag`` to ``defer+madvise``, or set
``MASKOPS_CPU_HUGE_PAGES=0`` (ordinary pages) if that matters more than the faults saved.
"""
from __future__ import annotations

import torch

__all__ = ["empty_cache", "cpu_cache_info", "set_cpu_cache_limit"]


def empty_cache() -> int:
    """Returns the CPU memory kept by maskops' buffer cache to the system.

    Tensors still alive are not affected. Returns the number of bytes released.
    """
    return int(torch.ops.maskops._cpu_cache_release())


def cpu_cache_info() -> dict:
    """The buffer cache's state: ``kept_bytes`` (memory kept now), ``limit_bytes``,
    ``hits`` (requests served from kept memory) and ``misses`` (requests that mapped new
    memory); ``bypassed`` is True in sanitizer builds, where every buffer comes from torch's
    allocator so that AddressSanitizer sees its bounds."""
    kept, limit, hits, misses, bypassed = torch.ops.maskops._cpu_cache_stats()
    return {"kept_bytes": kept, "limit_bytes": limit, "hits": hits, "misses": misses,
            "bypassed": bool(bypassed)}


def set_cpu_cache_limit(limit_bytes: int) -> int:
    """Sets how many bytes of freed memory the cache may keep (``0``: none; kept memory over
    the new limit is released). Returns the previous limit."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"limit_bytes must be an int, got {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"limit_bytes must be non-negative, got {limit_bytes}")
    return int(torch.ops.maskops._cpu_cache_set_limit(limit_bytes))
