"""Waiting for a quiet machine before a measurement (Linux /proc; a no-op elsewhere).

On a small shared machine a compiler or test run next door halves the numbers. `wait_quiet`
samples every process's CPU time twice and returns once no other process used more than
`max_share` of one core over the window (or after `timeout` seconds, reporting that it gave up).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _cpu_ticks() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(d.name)] = int(f[11]) + int(f[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return out


def busiest_other(window: float = 2.0) -> tuple[float, int | None]:
    """(share of one core, pid) of the busiest process other than this one over `window` s."""
    me = os.getpid()
    a = _cpu_ticks()
    time.sleep(window)
    b = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    best, who = 0.0, None
    for pid, t in b.items():
        if pid == me or pid not in a:
            continue
        share = (t - a[pid]) / hz / window
        if share > best:
            best, who = share, pid
    return best, who


def wait_quiet(timeout: float = 1800, max_share: float = 0.1) -> dict:
    """Blocks until the machine is quiet; returns what was observed."""
    if not Path("/proc/self/stat").exists() or timeout <= 0:
        return {"waited_s": 0.0, "quiet": None}
    t0 = time.time()
    said = False
    while True:
        share, pid = busiest_other()
        if share <= max_share:
            return {"waited_s": round(time.time() - t0, 1), "quiet": True}
        if time.time() - t0 > timeout:
            print(f"quiet: gave up after {timeout:.0f} s (pid {pid} at {share:.0%})", file=sys.stderr)
            return {"waited_s": round(time.time() - t0, 1), "quiet": False, "busiest_share": share}
        if not said:
            print(f"quiet: waiting for pid {pid} ({share:.0%} of a core) to finish ...", file=sys.stderr)
            said = True


def loadavg() -> str | None:
    """The 1-minute load average (None where /proc is missing)."""
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return None
