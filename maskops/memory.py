"""The CPU buffer cache behind maskops' large CPU outputs and workspaces.

A new multi-megabyte CPU buffer is mapped page by page as it is first written; for a
64 MB mask image that costs more than pasting the masks. So the CPU kernels take buffers of
1 MiB and more from a cache: memory freed by their tensors is kept (up to a limit) and given
to the next request of a similar size, and new buffers of 32 MiB and more are mapped with
transparent huge pages where the system allows it. The tensors are ordinary CPU tensors;
only their memory returns here when they are freed.

The limit on kept memory is ``MASKOPS_CPU_CACHE_MB`` (read when the cache is first used, by
an op or by a function here; default 1024, ``0`` keeps nothing; an unusable value warns and
keeps the default) or ``set_cpu_cache_limit()``; the oldest kept blocks are dropped first.
A request that no kept block fits gives back at least as many idle kept bytes (the oldest)
before new memory is mapped, so that what the cache keeps never raises the process's peak.
``empty_cache()`` gives kept memory back to the system. A forked process (a DataLoader
worker) starts with an empty cache. Memory handed out by the cache shows in
``torch.profiler`` memory profiles like torch's own allocations.

Where transparent huge pages are set to ``madvise`` with ``defrag=madvise``, the kernel may
compact memory to find a huge page for a new block (a one-off stall when memory is
fragmented). Keep the cache warm, set the system's ``defrag`` to ``defer+madvise``, or set
``MASKOPS_CPU_HUGE_PAGES=0`` (ordinary pages) if that matters more than the faults saved.

Inside ``with maskops.cpu_cache_for_torch():`` torch's own CPU allocations of 1 MiB and more
(convolution and matmul outputs, oneDNN's buffers) made by the thread in the block come from
the cache as well: a network's activations then reuse the previous call's memory instead of
faulting in fresh pages on every call. torch's CPU allocator is swapped only while a block is
open and put back when the last one ends; importing maskops or calling an op never changes it.
The Mask R-CNN of ``models/`` runs its eval-mode inference inside it;
``MASKOPS_CPU_CACHE_TORCH=0`` turns that off (the block then changes nothing).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

__all__ = ["empty_cache", "cpu_cache_info", "set_cpu_cache_limit", "cpu_cache_for_torch"]


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
    return {
        "kept_bytes": kept,
        "limit_bytes": limit,
        "hits": hits,
        "misses": misses,
        "bypassed": bool(bypassed),
    }


def set_cpu_cache_limit(limit_bytes: int) -> int:
    """Sets how many bytes of freed memory the cache may keep (``0``: none; kept memory over
    the new limit is released). Returns the previous limit."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"limit_bytes must be an int, got {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"limit_bytes must be non-negative, got {limit_bytes}")
    return int(torch.ops.maskops._cpu_cache_set_limit(limit_bytes))


#: The environment variable that turns :func:`cpu_cache_for_torch` off when set to ``0``.
ROUTE_ENV = "MASKOPS_CPU_CACHE_TORCH"


def _route_wanted(enabled: Optional[bool]) -> bool:
    if enabled is not None:
        return bool(enabled)
    return os.environ.get(ROUTE_ENV, "1").strip() != "0"


@contextlib.contextmanager
def cpu_cache_for_torch(enabled: Optional[bool] = None) -> Iterator[bool]:
    """Within the block, every CPU tensor of 1 MiB and more that torch allocates on this
    thread (any op) takes its memory from maskops' buffer cache, and gives it back there when
    freed.

    For repeated inference on the CPU: the activations of one call are mapped once and reused
    by the next, instead of being faulted in page by page each time (what that saves for a
    ResNet-50 Mask R-CNN, against torch's and the system's own allocators:
    ``benchmarks/results/allocator_*.md``). torch's CPU allocator is
    replaced only while a block is open, by one that routes the requests of threads inside a
    block and passes every other thread's to the allocator torch had; once the last block
    ends (blocks nest and may be open on several threads), that allocator is torch's again.
    Tensors made inside stay ordinary CPU tensors and may outlive the block, oneDNN's buffers
    (reordered weights) included: each is freed to whoever allocated it.

    Args:
        enabled: ``False`` makes the block change nothing; ``None`` (default) follows the
            environment: ``MASKOPS_CPU_CACHE_TORCH=0`` turns routing off.

    Yields whether this thread's allocations go to the cache (False when turned off, in
    sanitizer builds, or where torch's CPU allocator is not its default one, e.g. another
    library's registered allocator). Memory kept between calls is bounded by the limit
    (:func:`set_cpu_cache_limit`); :func:`empty_cache` returns it.
    """
    if not _route_wanted(enabled):
        yield False
        return
    routed = bool(torch.ops.maskops._cpu_cache_route_torch(True))
    try:
        yield routed
    finally:
        torch.ops.maskops._cpu_cache_route_torch(False)


def _torch_allocator_state() -> dict:
    """For tests: torch's CPU allocator now (``current``, an address), torch's default CPU
    allocator (``default``), maskops' routing allocator (``route``, 0 if never made), the
    blocks open on this thread (``depth``) and on all threads (``open``)."""
    current, default, route, depth, open_ = torch.ops.maskops._cpu_cache_torch_allocator()
    return {"current": current, "default": default, "route": route, "depth": depth, "open": open_}
