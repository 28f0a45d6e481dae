"""DecodeThreads (runtime/threads.py): no more threads than the cores other processes leave free."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from moecompress.runtime import threads
from moecompress.runtime.threads import RECHECK, WINDOW, DecodeThreads, busy_cores


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc/stat")
def test_a_core_another_process_keeps_busy_is_not_free():
    """A process spinning on one CPU counts as one busy core; this process's own spinning thread does not."""
    cpu = max(os.sched_getaffinity(0))
    burner = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    try:
        time.sleep(0.3)  # the child runs
        spinner.start()
        assert busy_cores(0.3) == 1
    finally:
        stop.set()
        spinner.join()
        burner.kill()
        burner.wait()


def test_the_count_follows_the_free_cores(monkeypatch):
    """At the start the free cores; a slow window re-checks them and drops a thread; after RECHECK steps on fewer
    threads than asked for they are checked again; the caller's count comes back at the end."""
    free = [1]
    monkeypatch.setattr(threads, "free_cores", lambda window=0: free[0])
    saved = torch.get_num_threads()
    with DecodeThreads(2) as governor:
        assert governor.count == 1 == torch.get_num_threads()
        free[0] = 2
        for _ in range(RECHECK):
            governor.step(0.001)
        assert governor.count == 2 == torch.get_num_threads()
        free[0] = 1
        for _ in range(WINDOW):
            governor.step(0.001)
        assert governor.count == 2  # a normal window: nothing re-checked
        for _ in range(WINDOW):
            governor.step(0.004)  # over twice the best median
        assert governor.count == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == saved
