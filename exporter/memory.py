"""Keep an export's peak memory down between stages."""

from __future__ import annotations

import gc


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    glibc keeps freed memory in its heap for reuse, so a process that has dropped a float
    model still holds its pages; the next stage's peak then adds to them. malloc_trim
    returns them (docs/benchmarks.md has what it saves). A no-op where the C library has
    no malloc_trim."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
