"""What the benchmarks share: the line that names the machine, and the resident-size function their
measuring child processes start with. Imported by the benchmark scripts, which run as
`python benchmarks/<name>.py` (their folder is then first on sys.path)."""

from __future__ import annotations

import os
import platform

# Put before the code of a child process (`python -c`): `rss_now()` is the process's resident size now,
# in bytes (Linux /proc), next to the peak `resource.getrusage(RUSAGE_SELF).ru_maxrss` (KiB).
RSS_NOW = r"""
import resource

def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
"""


def cpu_name() -> str | None:
    """The CPU model from /proc/cpuinfo, e.g. 'AMD EPYC 7B13'; None where it says none (or has none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def machine() -> str:
    """OS, CPU model, core count and RAM, e.g. 'Linux 6.1, AMD EPYC 7B13, 2 cores, 23 GiB RAM'."""
    cpu = cpu_name()
    if cpu is None:
        cpu = platform.processor() or platform.machine()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores{mem}"
