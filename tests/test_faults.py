"""One job per run folder (docs/architecture.md §4.5): ranks die with their launcher, and a live
run folder is locked against a second job.

Unit tests drive runtime/launcher.py and runtime/run_lock.py in small subprocesses; the slow ones
SIGKILL a real 2-rank torchrun (gloo) and start a second job into a live folder.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_train import ROOT, env, losses, run_train, small_data, train_cmd  # noqa: F401  (session dataset fixture)

from blip3o_fast.runtime import run_lock
from blip3o_fast.runtime.run_lock import RunFolderBusy, hold_run_lock

BOUND_S = 10.0  # a rank stops within this after its launcher dies


# -- helpers ------------------------------------------------------------------------------------------

def alive(pid: int) -> bool:
    """True while pid runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def wait_gone(pids: list[int], timeout: float) -> float:
    """Seconds until every pid is gone (or timeout)."""
    t0 = time.time()
    while any(alive(p) for p in pids) and time.time() - t0 < timeout:
        time.sleep(0.05)
    return time.time() - t0


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` (itself included) with its size and mtime."""
    out = {".": (0, folder.stat().st_mtime_ns)}
    for path in folder.rglob("*"):
        st = path.stat()
        out[str(path.relative_to(folder))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


def py(code: str, extra_env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env={**env(), **(extra_env or {})},
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# -- the parent-death watch ---------------------------------------------------------------------------

# a "launcher" that starts one child (as torchrun does: its own session), prints the child's pid, and waits
LAUNCHER = """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(600)
"""
RANK = """
import os, time
from blip3o_fast.runtime.launcher import follow_launcher
follow_launcher()
time.sleep(600)
"""


def launch(child_code: str, child_env: dict) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LAUNCHER), textwrap.dedent(child_code)],
                            env={**env(), **child_env}, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


@pytest.mark.parametrize("mode", ["prctl", "poll"])
def test_a_rank_exits_within_the_bound_when_its_launcher_is_sigkilled(mode):
    launcher, child = launch(RANK, {"RANK": "0", "LOCAL_RANK": "0", "BLIP3O_FAST_FOLLOW_LAUNCHER": mode})
    try:
        time.sleep(3)  # the child has imported and armed the watch
        assert alive(child)
        launcher.kill()
        launcher.wait()
        took = wait_gone([child], 30)
        assert not alive(child) and took < BOUND_S, f"{mode}: the rank outlived its launcher by {took:.1f} s"
    finally:
        kill_all([launcher.pid, child])


def test_a_lone_process_is_not_tied_to_its_parent():
    clean = {k: v for k, v in env().items() if k not in ("RANK", "LOCAL_RANK")}
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LAUNCHER), RANK], env=clean, cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())
    try:
        time.sleep(3)
        launcher.kill()
        launcher.wait()
        time.sleep(2)
        assert alive(child), "a process without a launcher must not die with its parent"
    finally:
        kill_all([launcher.pid, child])


def test_a_rank_whose_launcher_died_before_it_armed_the_watch_exits():
    # the child records its first parent, waits until that parent is gone, then arms: the race prctl misses
    late = """
        import os, time
        first = os.getppid()
        print("ready", flush=True)
        while os.getppid() == first:
            time.sleep(0.05)
        from blip3o_fast.runtime.launcher import follow_launcher
        follow_launcher(first)
        time.sleep(600)
    """
    launcher, child = launch(late, {"RANK": "0", "LOCAL_RANK": "0"})
    try:
        assert launcher.stdout.readline().strip() == "ready"
        launcher.kill()
        launcher.wait()
        took = wait_gone([child], 30)
        assert not alive(child) and took < BOUND_S
    finally:
        kill_all([launcher.pid, child])


# -- the run folder lock ------------------------------------------------------------------------------

HOLDER = """
    import sys, time
    from blip3o_fast.runtime.run_lock import hold_run_lock
    with hold_run_lock(sys.argv[1], "train") as lock:
        print(lock.kind, flush=True)
        time.sleep(600)
"""


def test_a_flock_held_by_another_process_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(folder)], env=env(), cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "flock"
        before = snapshot(folder)
        with pytest.raises(RunFolderBusy) as refused:
            with hold_run_lock(folder, "generate"):
                pass
        message = str(refused.value)
        assert "\n" not in message and f"pid {holder.pid}" in message and "in use by train (host " in message
        assert snapshot(folder) == before, "a refused job must not touch the run folder"
    finally:
        holder.kill()
        holder.wait()
    with hold_run_lock(folder, "train") as lock:  # the kernel released it with the holder
        assert lock.kind == "flock" and json.loads((folder / ".lock").read_text())["pid"] == os.getpid()


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without a working flock (as some network filesystems): the heartbeat fallback."""
    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(run_lock, "_flock", flock)
    monkeypatch.setenv(run_lock.STALE_ENV, "2")


def write_holder(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": "node-17", "pid": 4242, "purpose": "train", "started": "2026-01-01T00:00:00",
              "token": "theirs", "heartbeat": time.time(), **fields}
    (folder / ".lock").write_text(json.dumps(record) + "\n")


def test_a_fresh_heartbeat_lock_is_refused(no_flock, tmp_path):
    write_holder(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(RunFolderBusy, match=r"in use by train \(host node-17, pid 4242, since 2026-01-01T00:00:00\)"):
        with hold_run_lock(tmp_path, "train"):
            pass
    assert snapshot(tmp_path) == before


def test_a_stale_heartbeat_lock_is_taken_over_and_kept_fresh(no_flock, tmp_path):
    write_holder(tmp_path, heartbeat=time.time() - 10)  # older than the 2 s stale time
    with hold_run_lock(tmp_path, "train") as lock:
        assert lock.kind == "heartbeat" and "heartbeat file" in lock.describe()
        first = json.loads((tmp_path / ".lock").read_text())
        assert first["pid"] == os.getpid()
        time.sleep(1.2)  # beats every stale/4 = 0.5 s
        assert json.loads((tmp_path / ".lock").read_text())["heartbeat"] > first["heartbeat"]
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):  # and, being fresh, it is refused
            with hold_run_lock(tmp_path, "generate"):
                pass
    assert not (tmp_path / ".lock").exists(), "a released heartbeat lock is removed"


def test_a_heartbeat_lock_of_a_dead_process_on_this_host_is_stale_at_once(no_flock, tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_holder(tmp_path, host=socket.gethostname(), pid=dead.pid)
    with hold_run_lock(tmp_path, "train") as lock:
        assert lock.kind == "heartbeat"


# -- 2-rank jobs --------------------------------------------------------------------------------------

def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT,
                            start_new_session=True)


def wait_for_steps(proc: subprocess.Popen, run: Path, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= n):
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1][-3000:])
        assert time.time() < deadline, "no training progress"
        time.sleep(0.1)


def ranks_of(launcher: subprocess.Popen, n: int = 2) -> list[int]:
    deadline = time.time() + 120
    while len(kids := children(launcher.pid)) < n:
        if launcher.poll() is not None:
            raise AssertionError(f"torchrun exited {launcher.returncode}: {launcher.communicate()[1][-3000:]}")
        assert time.time() < deadline, "torchrun did not start its ranks"
        time.sleep(0.1)
    return kids


def files(run: Path) -> tuple[str, list[str]]:
    metrics = (run / "metrics.jsonl").read_text()
    checkpoints = sorted(p.name + ("+" if (p / "COMPLETE").exists() else "")
                         for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
    return metrics, checkpoints


@pytest.mark.slow
def test_ranks_stop_with_their_sigkilled_torchrun_and_write_nothing_after(small_data, tmp_path):  # noqa: F811
    run = tmp_path / "orphans"
    launcher = start(train_cmd(small_data, run, 100000, "train.ckpt_every=5", "train.keep_last=1000", procs=2))
    ranks = []
    try:
        ranks = ranks_of(launcher)
        wait_for_steps(launcher, run, 10)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        at_kill = files(run)
        took = wait_gone(ranks, 30)
        assert took < BOUND_S, f"ranks {[p for p in ranks if alive(p)]} outlived torchrun by {took:.1f} s"
        time.sleep(3)
        later = files(run)
        assert later == at_kill, "a step, metric line or checkpoint was written after the launcher died"
        assert "Traceback" not in launcher.stderr.read()
    finally:
        kill_all(ranks)
        kill_all([launcher.pid])


@pytest.mark.slow
def test_a_second_job_into_a_live_run_folder_is_refused_then_resumes_exactly(small_data, tmp_path):  # noqa: F811
    run = tmp_path / "live"
    flat = ("train.ckpt_every=100000", "train.min_lr=3e-3")  # a flat LR after warmup: the same for any train.steps
    first = start(train_cmd(small_data, run, 100000, *flat, procs=2))
    ranks = []
    try:
        ranks = ranks_of(first)
        wait_for_steps(first, run, 3)
        for pid in ranks:  # freeze the holder so that "untouched" means untouched by the second job
            os.kill(pid, signal.SIGSTOP)
        time.sleep(0.5)
        before = snapshot(run)
        t0 = time.time()
        second = run_train(small_data, run, 5, procs=2, check=False)
        refused_2ranks = time.time() - t0
        # rank 0 refuses with exit 2; rank 1 exits 2 too, unless torchrun's teardown (SIGTERM) is faster
        codes = re.findall(r"exitcode\s+: (-?\d+)", second.stderr)
        assert second.returncode != 0 and "2" in codes and set(codes) <= {"2", "-15"}, \
            f"the second job was not refused (exit {second.returncode}): {second.stderr[-2000:]}"
        assert refused_2ranks < 120, f"the refused ranks took {refused_2ranks:.0f} s to exit"
        holder = json.loads((run / ".lock").read_text())
        assert f"is in use by train (host {holder['host']}, pid {holder['pid']}" in second.stderr
        lone = run_train(small_data, run, 5, check=False)
        assert lone.returncode == 2, lone.stderr[-3000:]
        assert lone.stderr.strip().splitlines()[-1].startswith(f"blip3o-fast train: error: run folder {run} is in use "
                                                               f"by train (host {holder['host']}, pid {holder['pid']}")
        assert snapshot(run) == before, "the refused jobs touched the run folder"
        print(f"2-rank refusal took {refused_2ranks:.1f} s (process start included)")
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)  # the first job saves at its next step and ends
        out, err = first.communicate(timeout=300)
        # the ranks exit 75 (stopped after a checkpoint); torchrun reports any non-zero rank as its own 1 (and may
        # SIGTERM a rank that was about to exit 75 too)
        codes = set(re.findall(r"exitcode\s+: (-?\d+)", err))
        assert first.returncode == 1 and "75" in codes and codes <= {"75", "-15"}, err[-3000:]
    finally:
        kill_all(ranks)
        kill_all([first.pid])
    stopped = max(losses(run))
    resumed = run_train(small_data, run, stopped + 3, *flat, procs=2)
    assert f"at step {stopped}" in resumed.stdout
    straight = tmp_path / "straight"
    run_train(small_data, straight, stopped + 3, *flat, procs=2)
    assert losses(run) == losses(straight), "the resumed second job must repeat the uninterrupted run's losses"


@pytest.mark.slow
def test_eval_ranks_stop_with_their_sigkilled_torchrun(small_data, tmp_path):  # noqa: F811
    run = tmp_path / "trained"
    run_train(small_data, run, 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "blip3o_fast.cli", "eval", "--run-dir", str(run), "--steps", "100000", "--max-samples", "0"]
    launcher = start(cmd)
    ranks = []
    try:
        ranks = ranks_of(launcher)
        time.sleep(15)  # imported, sampling
        assert all(alive(p) for p in ranks) and launcher.poll() is None
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        took = wait_gone(ranks, 30)
        assert took < BOUND_S, f"eval ranks outlived torchrun by {took:.1f} s"
        assert not (run / "eval").exists()
    finally:
        kill_all(ranks)
        kill_all([launcher.pid])
