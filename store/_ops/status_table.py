"""The cluster status table that ``claypot status`` and the demo print.

Kept apart from the CLI so that the demo (which the CLI runs) needs no import
of the CLI back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


COLUMNS = ("BACKEND", "STATE", "ADDRESS", "HOST", "PID", "OBJECTS", "IN MEMORY", "RSS")


def status_row(b: Any) -> tuple:
    """One backend's row of the status table, as strings in COLUMNS order."""
    state = "up" if b.up else ("stopped" if getattr(b, "stopped", False) else "DOWN")
    return (
        b.backend_id[:8],
        state,
        b.address,
        b.host[:14],
        str(b.pid),
        str(b.objects),
        str(b.resident_objects),
        _human(b.memory_bytes),
    )


def format_status(rows: Sequence[Any]) -> str:
    """The status table as plain text (what `claypot status` prints when piped)."""
    head = (
        f"{'BACKEND':<10} {'STATE':<7} {'ADDRESS':<22} {'HOST':<14} {'PID':>7} "
        f"{'OBJECTS':>8} {'IN MEMORY':>9} {'RSS':>10}"
    )
    lines = [head]
    for b in rows:
        r = status_row(b)
        lines.append(f"{r[0]:<10} {r[1]:<7} {r[2]:<22} {r[3]:<14} {r[4]:>7} {r[5]:>8} {r[6]:>9} {r[7]:>10}")
    lines.append(status_summary(rows))
    return "\n".join(lines)


def status_summary(rows: Sequence[Any]) -> str:
    """The line under the status table: backends, how many are up, objects."""
    total = sum(b.objects for b in rows)
    return f"{len(rows)} backend(s), {sum(1 for b in rows if b.up)} up, {total} object(s)"
