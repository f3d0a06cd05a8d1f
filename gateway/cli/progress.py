"""The progress of a run on stderr: a live bar on a terminal, nothing otherwise."""
from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm


class Silent:
    """No progress shown (not a terminal, or --quiet)."""

    def show(self, counts: dict[str, int], saved: int) -> None:
        """Nothing to show."""

    def close(self) -> None:
        """Nothing to close."""


class Bar(Silent):
    """A tqdm bar of finished items out of `total`, with the counts of each status after it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._bar: tqdm | None = None

    def show(self, counts: dict[str, int], saved: int) -> None:
        """Bring the bar up to date with the items' `counts` by status and the `saved` items."""
        finished = counts["succeeded"] + counts["failed"] + counts["canceled"]
        if self._bar is None:  # starts at what is already finished, so rate and ETA count only this run
            self._bar = tqdm(total=self.total, initial=finished, unit="img", file=sys.stderr, smoothing=0.1,
                             **_bar_width())
        elif finished != self._bar.n:
            self._bar.update(finished - self._bar.n)
        extra = f" canceled {counts['canceled']}" if counts["canceled"] else ""
        self._bar.set_postfix_str(f"done {counts['succeeded']} failed {counts['failed']}{extra} "
                                  f"running {counts['running']} saved {saved}")

    def close(self) -> None:
        """Leave the bar's last state on the screen."""
        if self._bar is not None:
            self._bar.close()


def make_progress(enabled: bool, total: int) -> Silent:
    """A Bar when `enabled`, else Silent."""
    return Bar(total) if enabled else Silent()


def _bar_width() -> dict[str, Any]:
    """Follow the terminal's size; a terminal that reports none (0 x 0, as some pseudo-terminals
    do) gets 80 x 24: tqdm hides a bar on a screen of 0 rows."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        size = os.terminal_size((0, 0))
    return {"dynamic_ncols": True} if size.columns and size.lines else {"ncols": 80, "nrows": 24}
