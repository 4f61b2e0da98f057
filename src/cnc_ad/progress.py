"""Progress bars that suit where they are shown: live on a terminal, a line a minute in a log file."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

LOG_INTERVAL_S = 60.0
"""Seconds between updates when stderr is not a terminal (a log file or a pipe), so logs are not flooded."""


def progress_bar(iterable: Iterable[T] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; disabled when ``enabled`` is False; at most one update a minute off a terminal."""
    if not _is_terminal():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, kwargs.get("maxinterval", 0.0)))
    return tqdm(iterable, disable=not enabled, **kwargs)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
