"""Progress bars: live on a terminal, at most one update a minute in a log file."""

from __future__ import annotations

import io
import sys

from cnc_ad.progress import LOG_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_do_not_flood_a_log(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress_bar(range(3), desc="x")
    assert bar.mininterval == LOG_INTERVAL_S >= 60 and list(bar) == [0, 1, 2]
    monkeypatch.setattr(sys, "stderr", _Terminal())
    live = progress_bar(range(3))
    assert live.mininterval < 1 and not live.disable
    live.close()
    assert progress_bar(range(3), enabled=False).disable
