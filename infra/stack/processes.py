"""Which processes on this machine belong to a local stack, found with psutil (Linux, macOS, any POSIX system).

A stack's processes are found three ways, because each alone misses some:
- the session of each recorded leader (started with `start_new_session`): Ray's helpers, workers
  and agents stay in it, but many rename themselves with `setproctitle`, which overwrites their
  environment block, so their tag is no longer readable;
- the environment tag `RECOLOR_STACK_ID=<id>`, inherited by every descendant that keeps its
  environment: it still finds the orphans of a leader that died;
- descendants of everything found, by parent PID: Ray job drivers start their own session.
A session counts as the stack's only while its recorded leader is alive with the recorded start
time, or when one of its members carries the tag, so a reused PID never makes a stranger's
session ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    session: int
    start_time: int  # milliseconds since the epoch: (pid, start_time) names a process even after its PID is reused
    tagged: bool


def process_start_time(pid: int) -> int | None:
    """The process's start time in milliseconds since the epoch; None when it is gone or a zombie."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return int(process.create_time() * 1000)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def scan(tag: bytes) -> dict[int, ProcessInfo]:
    """Every live process this user can see, with whether its environment holds `tag` (e.g. b"NAME=value")."""
    name, _, value = tag.decode().partition("=")
    processes = {}
    for process in psutil.process_iter(["pid", "ppid", "create_time", "status"]):
        info = process.info
        if info["status"] == psutil.STATUS_ZOMBIE or info["create_time"] is None:
            continue
        try:
            session = os.getsid(info["pid"])
        except OSError:  # gone meanwhile
            continue
        try:
            tagged = process.environ().get(name) == value
        except (psutil.Error, OSError):  # gone, or another user's
            tagged = False
        start = int(info["create_time"] * 1000)
        processes[info["pid"]] = ProcessInfo(info["pid"], info["ppid"], session, start, tagged)
    return processes


def stack_members(tag: bytes, leaders: dict[int, int]) -> dict[int, int]:
    """The live processes of a stack: {pid: start_time}.

    Args:
        tag: the environment entry every process of the stack inherits, b"RECOLOR_STACK_ID=<id>".
        leaders: the recorded session leaders, {pid: start_time}.
    """
    processes = scan(tag)
    sessions = {pid for pid, start in leaders.items() if pid in processes and processes[pid].start_time == start}
    sessions |= {info.session for info in processes.values() if info.tagged}
    members = {pid for pid, info in processes.items() if info.session in sessions or info.tagged}
    grown = True
    while grown:  # add descendants until nothing new turns up
        children = {pid for pid, info in processes.items() if info.ppid in members} - members
        members |= children
        grown = bool(children)
    # Never this process or its ancestors (a `down` run from inside a stack job must not kill itself first).
    pid = os.getpid()
    while pid in processes and pid > 1:
        members.discard(pid)
        pid = processes[pid].ppid
    return {pid: processes[pid].start_time for pid in members}


def still_alive(known: dict[int, int]) -> dict[int, int]:
    """The entries of {pid: start_time} whose process still runs (same PID, same start time)."""
    return {pid: start for pid, start in known.items() if process_start_time(pid) == start}
