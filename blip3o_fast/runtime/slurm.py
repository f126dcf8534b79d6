"""SLURM tasks become ranks of one job (docs/architecture.md §4.6).

`srun python -m blip3o_fast.cli train ...` starts one task per rank with SLURM_PROCID, SLURM_NTASKS and
SLURM_LOCALID set but none of torch's launcher variables. `rank_env(environ)` maps the first to the
second, so `init_process_group(env://)` joins them into one job, exactly as torchrun's ranks would:

    RANK = SLURM_PROCID    WORLD_SIZE = SLURM_NTASKS    LOCAL_RANK = SLURM_LOCALID
    MASTER_ADDR = the first host of SLURM_JOB_NODELIST (expanded: `node[01-04]` -> node01)
    MASTER_PORT = 10000 + SLURM_JOB_ID % 20000 (every task of a job derives the same one)

Variables already set win (a torchrun or deepspeed launched inside an allocation sets RANK itself, and
MASTER_ADDR/MASTER_PORT may be exported by the job script). `BLIP3O_FAST_SLURM=off` turns the mapping off.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from ..errors import UserError

MODE_ENV = "BLIP3O_FAST_SLURM"  # auto (default) | off
PORT_BASE, PORT_SPAN = 10000, 20000
_RANGE = re.compile(r"\[([^\]]*)\]")


class HostlistError(UserError):
    """SLURM_JOB_NODELIST could not be read."""


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list, expanded in order: `a[01-03,07],b5` -> a01 a02 a03 a07 b5.

    Numeric ranges keep their zero padding (`[08-10]` -> 08 09 10); several bracket groups in one name
    multiply (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2), as `scontrol show hostnames` does."""
    hosts: list[str] = []
    for name in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_name(name, hostlist))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Splits at commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_name(name: str, whole: str) -> list[str]:
    m = _RANGE.search(name)
    if m is None:
        if "[" in name or "]" in name:
            raise HostlistError(f"SLURM_JOB_NODELIST={whole!r} has an unbalanced bracket in {name!r}: "
                                "set MASTER_ADDR to the first node's host name")
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    out = []
    for item in m.group(1).split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise HostlistError(f"SLURM_JOB_NODELIST={whole!r}: {item!r} is not a number or a range a-b: "
                                "set MASTER_ADDR to the first node's host name")
        width = len(lo)
        for n in range(int(lo), int(hi if sep else lo) + 1):
            out.extend(head + str(n).zfill(width) + rest for rest in _expand_name(tail, whole))
    return out


def under_srun(environ: Mapping[str, str]) -> bool:
    """True in an srun task that no torch launcher started (so its rank must come from SLURM)."""
    return (environ.get(MODE_ENV, "auto") != "off" and "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ
            and "RANK" not in environ)


def rank_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch launcher variables an srun task lacks, derived from SLURM's; {} outside srun."""
    if not under_srun(environ):
        return {}
    world = int(environ["SLURM_NTASKS"])
    out = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(world),
           "LOCAL_RANK": environ.get("SLURM_LOCALID", "0")}
    per_node = environ.get("SLURM_NTASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", ""))
    if re.match(r"^\d+", per_node):  # "4" or "4(x2)": the first node's count
        out["LOCAL_WORLD_SIZE"] = re.match(r"^\d+", per_node).group(0)
    if world > 1 and "MASTER_ADDR" not in environ:
        nodes = environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", ""))
        hosts = expand_hostlist(nodes)
        if not hosts:
            raise HostlistError("srun task without SLURM_JOB_NODELIST: set MASTER_ADDR to the first node's host name")
        out["MASTER_ADDR"] = hosts[0]
    if world > 1 and "MASTER_PORT" not in environ:
        job = environ.get("SLURM_JOB_ID", environ.get("SLURM_JOBID", ""))
        if not job.isdigit():
            raise UserError("srun task without a numeric SLURM_JOB_ID: set MASTER_PORT (the same free port on "
                            "every task)")
        out["MASTER_PORT"] = str(PORT_BASE + int(job) % PORT_SPAN)
    return out


def adopt_slurm_ranks() -> dict[str, str]:
    """Puts the derived variables into this process's environment; returns them ({} outside srun)."""
    derived = rank_env(os.environ)
    os.environ.update(derived)
    return derived
