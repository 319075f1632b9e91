"""Measuring helpers shared by the benchmarks: device sync, peak memory, MiB formatting.

Peak memory: on CUDA the allocator's peak above what was allocated when the call started;
on CPU the peak resident set size (VmHWM, reset through /proc/self/clear_refs) above the
resident size at the start, so run each case in a fresh process for a clean baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory that fn() adds above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    fn()
    return (_proc_status_kib("VmHWM") - base) * 1024
