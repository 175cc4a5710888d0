"""The launcher's promises that the tools and the tests lean on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kv_tools import launcher

WAIT = 30.0
# A launcher process: spawns a long sleeper through kv_tools.launcher, records its pid, waits.
PARENT = """
import sys, time
from pathlib import Path
from kv_tools import launcher
child = launcher.spawn([sys.executable, "-c", "import time; time.sleep(600)"], Path(sys.argv[1]))
Path(sys.argv[2]).write_text(str(child.pid))
time.sleep(600)
"""

# Ignores SIGTERM, then says so by creating the file named by its argument.
STUBBORN = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pathlib.Path(sys.argv[1]).touch()
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _until(condition: object, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(launcher.POLL_INTERVAL)


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signals are Linux's")
def test_a_spawned_process_dies_with_a_killed_parent(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "child.log"), str(pid_file)],
        stdin=subprocess.DEVNULL,
    )
    child = 0
    try:
        _until(lambda: pid_file.exists() and pid_file.read_text() != "", "the child's pid")
        child = int(pid_file.read_text())
        assert _alive(child)
        parent.kill()  # kill -9: the parent runs no cleanup at all
        parent.wait(timeout=WAIT)
        _until(lambda: not _alive(child), "the orphaned child to die")
    finally:
        parent.kill()
        parent.wait(timeout=WAIT)
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_stop_stops_every_process_even_one_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = [sys.executable, "-c", STUBBORN, str(tmp_path / "ready")]
    polite = [sys.executable, "-c", "import time; time.sleep(600)"]
    processes = [
        launcher.spawn(stubborn, tmp_path / "stubborn.log"),
        launcher.spawn(polite, tmp_path / "polite.log"),
    ]
    try:
        _until(lambda: (tmp_path / "ready").exists(), "the SIGTERM handler")
        launcher.stop(processes, timeout=0.5)
        assert [p.returncode for p in processes] == [-signal.SIGKILL, -signal.SIGTERM]
    finally:
        for process in processes:
            launcher.kill(process)
