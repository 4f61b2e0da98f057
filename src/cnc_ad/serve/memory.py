"""Handing memory that the model freed back to the operating system: glibc's ``malloc_trim``, where it exists.

Why: under glibc, ``cnc serve``'s resident memory grew by 120 to 240 MB over 1,200 to 2,100 requests while the
memory in use stayed flat (``mallinfo2``: about 190 MB in use throughout; the objects that Python's garbage
collector tracks did not change in number either). What grew was free memory that malloc kept. Each thread that
allocates gets an arena of its own (up to 8 per core): the batcher thread's model calls allocate and free hundreds
of MB of activations per call, sized by the batch size, and the decoding threads allocate too. The freed chunks stay
fragmented inside the arenas, which glibc shrinks only from the top, so they are not returned by themselves.
``malloc_trim(0)`` returns the free pages of every arena: 1,434 -> 963 MiB after 1,200 requests. It is not free: it
walks every arena (28 ms on average here, up to 170 ms), and the next model call faults its memory back in, so the
batcher calls it when idle and, under load, at most every ``ServeSettings.release_memory_s`` seconds. docs/serve.md
has the measurements.

Where the C library is not glibc (macOS, Windows, musl) this does nothing. Under a preloaded allocator (jemalloc,
tcmalloc), which returns memory by itself, glibc's heap is barely used and the trim has next to nothing to do.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    """The C function ``malloc_trim`` of glibc, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries: no libc.so.6, or no malloc_trim in it
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_MALLOC_TRIM = _glibc_malloc_trim()


def release_free_memory() -> bool:
    """Hand the free pages of the C heap back to the operating system (glibc's ``malloc_trim(0)``).

    Returns:
        Whether memory was released (False: there was none to release, or the C library is not glibc).
    """
    return _MALLOC_TRIM is not None and bool(_MALLOC_TRIM(0))
