"""Keep the forward pass's freed buffers in the process instead of handing them back to the kernel.

glibc's malloc returns large freed blocks to the kernel at once (mmap threshold, heap trimming), so every forward
pass maps its activation buffers afresh and page-faults them in, a large share of a small model's pass on a CPU
(docs/performance.md, "Results"). Peak memory does not change: the same buffers are reused instead of remapped.
The serving stages call it too: the messages between them (a batch of 448x448 images is several MB) paid the same
page faults at every hop."""

from __future__ import annotations

import ctypes
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 32 * 2**20  # glibc's largest mmap threshold on 64-bit


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once. False where the C library has no such
    settings (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    except AttributeError:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, 4 * _KEEP_BYTES))
