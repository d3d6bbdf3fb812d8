"""The live status line: what the cluster is doing for this job.

Drawn with rich, only when stdout is a terminal and ``spinner=True``. While it
is up, what the job prints goes above it (rich redirects stdout and stderr).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any


class Spinner:
    def __init__(self, enabled: bool, function_name: str) -> None:
        self.enabled = bool(enabled) and _is_terminal()
        self.function_name = function_name
        self._live: Any = None
        self._spinner: Any = None
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def start(self) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.live import Live
        from rich.spinner import Spinner as RichSpinner

        self._spinner = RichSpinner("dots", text=f"Starting {self.function_name}...")
        self._live = Live(
            self._spinner,
            console=Console(file=sys.stdout),
            refresh_per_second=12,
            transient=True,
            redirect_stdout=True,
            redirect_stderr=True,
        )
        self._live.start()

    def update(self, status: dict[str, Any] | None) -> None:
        if self._spinner is None or not status:
            return
        self._spinner.update(text=describe(status, self.function_name))

    def stop(self) -> None:
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None
                self._spinner = None


def describe(status: dict[str, Any], function_name: str) -> str:
    done = status.get("n_done", 0)
    total = status.get("n_inputs")
    uploaded = status.get("n_uploaded", 0)
    total_text = f"{total:,}" if total is not None else f"{uploaded:,}+"
    parts = [f"{function_name}: {done:,}/{total_text} done"]
    if status.get("phase"):
        parts.append(status["phase"])
    if status.get("retried"):
        parts.append(f"{status['retried']:,} retried")
    if status.get("failed"):
        parts.append(f"{status['failed']:,} failed")
    rate = status.get("calls_per_second") or 0
    if rate:
        parts.append(f"{rate:,.0f} calls/s")
    return " · ".join(parts)


def _is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False
