"""Threads of the decode loop: no more than the cores other processes leave free. The native kernels and inductor's
code share torch's one OpenMP runtime (runtime/native.py binds to its libgomp), whose workers spin at each barrier;
with more threads than free cores, a barrier waits for a descheduled thread's next time slice (moe-tiny-text, 2
threads, one core busy with another process: 76-298 tokens/s, against 507-707 on one thread).

    threads = DecodeThreads(torch.get_num_threads())
    with threads:                                             # as many as are free at the start
        for each step: ...; threads.step(seconds)            # re-checked when steps slow down"""

from __future__ import annotations

import os
import statistics
import time

import torch

WINDOW = 16  # steps per median
RECHECK = 256  # steps after which fewer threads than asked for try again
FRESH = 1.0  # seconds a measured count of free cores serves the next generate


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """(idle, total) jiffies of each CPU of `cpus`, from /proc/stat."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                values = [int(v) for v in fields[:8]]
                times[int(name[3:])] = (values[3] + values[4], sum(values))
    return times


def busy_cores(window: float = 0.05) -> int:
    """How many of this process's CPUs (its affinity) other processes kept busy over `window` seconds: all the
    CPUs' busy time less this process's own (its spinning OpenMP workers, a llama.cpp beside it), in cores, rounded;
    0 where /proc/stat cannot be read."""
    cpus = os.sched_getaffinity(0)
    try:
        before, own = _cpu_times(cpus), os.times()
        time.sleep(window)
        after, own_after = _cpu_times(cpus), os.times()
    except OSError:
        return 0
    busy = 0.0
    for cpu, (idle, total) in after.items():
        idle0, total0 = before.get(cpu, (idle, total))
        busy += 1 - (idle - idle0) / (total - total0) if total > total0 else 0.0
    mine = (own_after.user + own_after.system - own.user - own.system) / (own_after.elapsed - own.elapsed)
    return max(0, round(busy - mine))


def free_cores(window: float = 0.05) -> int:
    """The CPUs this process may run on less those other processes keep busy; at least 1."""
    return max(1, len(os.sched_getaffinity(0)) - busy_cores(window))


class DecodeThreads:
    """torch's thread count for the generates of one decoder: at most `limit`, no more than the free cores at each
    start (a count measured under FRESH seconds before is reused: back-to-back generates do not wait for a new
    measurement); re-checked when the median of WINDOW steps is over twice the best one seen at this count (another
    process took a core), and after RECHECK steps below `limit` (it may have left). The caller's count comes back
    at the end of each generate."""

    def __init__(self, limit: int):
        self.limit, self.count, self.checked = max(1, limit), 0, None  # checked: (time.monotonic(), free cores)

    def __enter__(self) -> DecodeThreads:
        self.saved = torch.get_num_threads()
        self._use(min(self.limit, self._free(FRESH)))
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.saved)

    def _free(self, fresh: float) -> int:
        now = time.monotonic()
        if self.checked is None or now - self.checked[0] > fresh:
            self.checked = (now, free_cores())
        return self.checked[1]

    def _use(self, count: int) -> None:
        torch.set_num_threads(count)
        self.count, self.best, self.window, self.since = count, float("inf"), [], 0

    def step(self, seconds: float) -> None:
        self.window.append(seconds)
        self.since += 1
        if len(self.window) < WINDOW:
            return
        median, self.window = statistics.median(self.window), []
        slow, self.best = median > 2 * self.best, min(self.best, median)
        if slow or (self.count < self.limit and self.since >= RECHECK):
            count = min(self.limit, self._free(0.0))
            if count != self.count:
                self._use(count)
            else:  # the same count: this pace is the one to compare with from now on
                self.best, self.since = median, 0
