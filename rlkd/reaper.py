"""The private Ray cluster a driver started does not outlive it.

`ray.shutdown()` stops the cluster at a clean end, and the driver then removes the session directory
(`/tmp/ray/session_*`). A driver killed with SIGKILL runs neither: its raylet and GCS notice, but the
dashboard and runtime-env agents and idle workers linger. So when rlkd starts a cluster it also starts
this watcher, in its own session (a Ctrl-C for the driver does not reach it):

    python -m rlkd.reaper DRIVER_PID SESSION_DIR

While the driver lives it records the cluster's processes (the driver's children whose command line
names the session directory, and all their descendants). When the driver dies it gives them `GRACE_S`
seconds to exit, kills the rest and removes the session directory. When the cluster's processes are gone
while the driver lives (`ray.shutdown()` ran, perhaps from an exit handler), it removes the session
directory and exits. psutil compares each process's start
time, so a reused pid is never signalled.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

POLL_S = 1.0
GRACE_S = 10.0


def start(session_dir: str) -> None:
    """Start the watcher for this process's cluster (best effort: without it only a SIGKILL'd driver leaks)."""
    if not Path(session_dir).name.startswith("session_"):
        return
    subprocess.Popen([sys.executable, "-m", "rlkd.reaper", str(os.getpid()), session_dir], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cluster_processes(driver: psutil.Process, session_dir: str) -> list[psutil.Process]:
    out = []
    for child in driver.children():
        if child.pid == os.getpid():  # this watcher names the session directory too
            continue
        try:
            if any(session_dir in arg for arg in child.cmdline()):
                out += [child, *child.children(recursive=True)]
        except psutil.Error:
            continue
    return out


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie (an orphan whose exit nobody has collected yet is gone for our purpose)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def remove_session(session_dir: str) -> None:
    if Path(session_dir).name.startswith("session_"):
        shutil.rmtree(session_dir, ignore_errors=True)


def watch(driver_pid: int, session_dir: str, poll: float = POLL_S, grace: float = GRACE_S) -> None:
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, psutil.Process] = {}
    while alive(driver):
        try:
            for p in cluster_processes(driver, session_dir):
                seen.setdefault(p.pid, p)
        except psutil.Error:
            pass
        if seen and not any(alive(p) for p in seen.values()):
            remove_session(session_dir)  # ray.shutdown() ran (a later ray.init gets a new session directory)
            return
        time.sleep(poll)
    deadline = time.time() + grace
    while time.time() < deadline and any(alive(p) for p in seen.values()):
        time.sleep(poll)  # Ray's own processes notice the dead driver and most exit by themselves
    for p in seen.values():
        if alive(p):
            try:
                p.kill()
            except psutil.Error:
                pass
    remove_session(session_dir)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
