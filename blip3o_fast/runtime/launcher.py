"""Ranks follow their launcher (docs/architecture.md §4.5): when the process that started this one
(torchrun, the deepspeed launcher) is gone, this process dies at once.

torchrun starts every worker in its own session, so a SIGKILLed launcher takes none of them with it;
orphaned ranks would train on and write into the run folder beside the job that replaces them.

Linux: prctl(PR_SET_PDEATHSIG, SIGKILL) makes the kernel kill this process the moment its parent
exits, whatever it is doing (even blocked in a collective). A watchdog thread also compares getppid()
with the launcher's pid twice a second: off Linux it is the mechanism, on Linux a backstop.
SIGKILL, not SIGTERM: SIGTERM means "save and stop" (§4.2); a dead launcher means stop now, so a
checkpoint being written stays without its COMPLETE marker and none is started.

PR_SET_PDEATHSIG fires when the parent *thread* exits. torchrun and the deepspeed launcher spawn
ranks from their main thread, which lives as long as they do; for a launcher that spawns from a
short-lived thread, BLIP3O_FAST_FOLLOW_LAUNCHER=poll keeps only the watchdog (=off disables both).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

MODE_ENV = "BLIP3O_FAST_FOLLOW_LAUNCHER"  # prctl (default) | poll | off
LAUNCHED_ENV = ("RANK", "LOCAL_RANK")  # set by torchrun and deepspeed for each rank
POLL_S = 0.5
_PR_SET_PDEATHSIG = 1

_followed: int | None = None
_decided = False


def launched() -> bool:
    """True when a launcher started this process as one rank of a job."""
    return any(name in os.environ for name in LAUNCHED_ENV)


def follow_launcher(launcher_pid: int | None = None) -> int | None:
    """Makes this process die with its launcher; returns the launcher's pid, or None where there is
    none (a lone process). Call it first thing: the launcher is the parent this process started with.
    Idempotent."""
    global _followed, _decided
    if _decided:  # decided once: a lone process's distributed.init() later puts RANK in its environment
        return _followed
    _decided = True
    mode = os.environ.get(MODE_ENV, "prctl")
    if mode == "off" or not launched():
        return None
    pid = os.getppid() if launcher_pid is None else launcher_pid
    if mode == "prctl" and sys.platform.startswith("linux"):
        _set_parent_death_signal(signal.SIGKILL)
    _followed = pid
    # the launcher may have died before prctl ran: then no death signal will ever come
    if not parent_alive(pid):
        _die()
    threading.Thread(target=_watch, args=(pid,), name="follow-launcher", daemon=True).start()
    return pid


def parent_alive(launcher_pid: int) -> bool:
    """False once the launcher is gone: this process was reparented (to init or a subreaper)."""
    return os.getppid() == launcher_pid


def stop_if_orphaned() -> None:
    """Dies now if the launcher is gone (before starting work it may not be able to finish)."""
    if _followed is not None and not parent_alive(_followed):
        _die()


def _set_parent_death_signal(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no prctl here: the watchdog alone
        return False


def _watch(launcher_pid: int) -> None:
    stop = threading.Event()  # never set: wait() is an interruptible sleep, not a busy loop
    while parent_alive(launcher_pid):
        stop.wait(POLL_S)
    _die()


def _die() -> None:
    try:  # stderr may be a pipe nobody reads any more
        print(f"blip3o-fast: launcher gone (pid {_followed}); rank {os.environ.get('RANK', '?')} stops now",
              file=sys.stderr, flush=True)
    except BaseException:
        pass
    os.kill(os.getpid(), signal.SIGKILL)
