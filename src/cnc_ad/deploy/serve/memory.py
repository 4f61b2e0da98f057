"""Keeping the memory that the model freed from piling up in glibc's malloc: one arena, and ``malloc_trim``.

Why: under glibc, a long-running server's resident memory grows while the memory in use stays flat. What grows is free
memory that malloc keeps: each thread that allocates gets an arena of its own (up to 8 per core), the batcher's model
calls allocate and free large activations sized by the batch, and the freed chunks stay fragmented inside the arenas,
which glibc shrinks only from the top. docs/serve.md ("Memory") has the measurements behind this and the effect of each
measure.

Two measures, both no-ops where the C library is not glibc (macOS, Windows, musl):

* :func:`release_free_memory`, ``malloc_trim(0)``, returns the free pages of every arena. It is not free (it walks
  every arena, and the next model call faults its memory back in), so the batcher calls it when idle and, under load,
  at most every ``ServeSettings.release_memory_s`` seconds.
* :func:`limit_arenas`, ``mallopt(M_ARENA_MAX, n)``, which ``cnc serve`` calls with ``ServeSettings.malloc_arenas``
  (1) before it loads the model and its threads start (a thread that has allocated keeps its arena): with all threads
  in one arena, one thread's freed memory serves the next thread's allocation and every idle release trims all of it.
  A ``MALLOC_ARENA_MAX`` in the environment wins over the setting.

Under a preloaded allocator (jemalloc, tcmalloc), which returns memory by itself, glibc's heap is barely used and
both have next to nothing to do.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Mapping

# glibc's malloc.h: the mallopt parameter that caps the number of arenas (what MALLOC_ARENA_MAX sets at startup).
M_ARENA_MAX = -8
ARENA_MAX_ENV = "MALLOC_ARENA_MAX"


def _glibc_function(name: str, argtypes: list[type], restype: type) -> Callable[..., int] | None:
    """The C function ``name`` of glibc, or None where the C library is not glibc (or lacks it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):  # musl and other C libraries: no libc.so.6, or no such function in it
        return None
    function.argtypes = argtypes
    function.restype = restype
    return function


_MALLOC_TRIM = _glibc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
_MALLOPT = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)


def limit_arenas(arenas: int | None, environ: Mapping[str, str] | None = None) -> bool:
    """Cap the number of glibc malloc arenas at ``arenas`` (``mallopt(M_ARENA_MAX, arenas)``), for threads to come.

    Call it before the threads that allocate start (``cnc serve`` does, before it loads the model): a thread that
    already has an arena keeps it. Threads started later share the existing arenas once there are ``arenas`` of them.

    Args:
        arenas: the most arenas; None: leave glibc's default (8 per core).
        environ: the environment (default ``os.environ``). Where ``MALLOC_ARENA_MAX`` is set there, glibc has read it
            at startup and it wins: nothing is changed.

    Returns:
        Whether the cap was set (False: ``arenas`` is None, ``MALLOC_ARENA_MAX`` is set, or the C library is not glibc).

    Raises:
        ValueError: ``arenas`` is below 1.
    """
    if arenas is None:
        return False
    if arenas < 1:
        raise ValueError(f"arenas must be >= 1 or None, got {arenas}")
    if ARENA_MAX_ENV in (os.environ if environ is None else environ) or _MALLOPT is None:
        return False
    return bool(_MALLOPT(M_ARENA_MAX, arenas))


def release_free_memory() -> bool:
    """Hand the free pages of the C heap back to the operating system (glibc's ``malloc_trim(0)``).

    Returns:
        Whether memory was released (False: there was none to release, or the C library is not glibc).
    """
    return _MALLOC_TRIM is not None and bool(_MALLOC_TRIM(0))
