"""The `blip3o-fast` command.

Each area registers its own subcommands through an `add_commands(subparsers)` function in a light
module of this folder (argparse only; the work is imported inside each command, so `--help` is fast).
A user mistake (`UserError`) prints one line and exits 2; anything else is a bug and keeps its traceback
(exit 1). The codes live in runtime/exit_codes.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..errors import UserError
from ..runtime import exit_codes
from ..runtime.launcher import follow_launcher
from ..runtime.logs import configure_logging
from ..runtime.slurm import adopt_slurm_ranks
from . import bench, config, data, eval, export, generate, info, train

# each module registers its subcommands with add_commands(subparsers), listed in this order
COMMAND_MODULES = (info, config, data, train, eval, export, generate, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o-fast", description=__doc__.splitlines()[0])
    # the deepspeed launcher passes --local_rank=N before the subcommand (ranks come from the environment)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    follow_launcher()  # first: under torchrun/deepspeed every command dies with its launcher (§4.5)
    adopt_slurm_ranks()  # an srun task is a rank of one job, for every command (§4.6)
    configure_logging()  # INFO lines reach a batch job's log file, tagged with the rank
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `section.key=value` overrides may come anywhere, also between options (argparse takes one run of them)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"blip3o-fast {args.command}: error: {e}", file=sys.stderr)
        return exit_codes.USER_ERROR
    except BrokenPipeError:  # `blip3o-fast config list | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush is silent
        return exit_codes.OK
    except KeyboardInterrupt:
        print(f"blip3o-fast {args.command}: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED
    except Exception:  # a bug: the traceback, and the one code a job script reads as "crashed"
        traceback.print_exc()
        sys.stderr.flush()
        return exit_codes.CRASH
    finally:
        if "torch.distributed" in sys.modules:  # a command that joined a process group leaves it (§4.5)
            from ..runtime import distributed

            distributed.shutdown()

