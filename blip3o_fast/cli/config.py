"""`blip3o-fast config list` and `blip3o-fast config show NAME [section.key=value ...]`: the configs shipped
in the package, and any config resolved (includes merged, overrides applied) as one YAML to copy and edit."""

from __future__ import annotations


def run_list(args) -> int:
    from ..config.loading import resolve_config, shipped_names

    for name in shipped_names():
        first = resolve_config(name).read_text().splitlines()[:1]
        note = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        print(f"{name:20s} {note}")
    return 0


def run_show(args) -> int:
    from ..config import load_config

    print(f"# blip3o-fast config show {' '.join([args.name, *args.overrides])}")
    print(load_config(args.name, args.overrides).to_yaml(), end="")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("config", help="list the shipped configs, or print one resolved (a template to copy)")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    q = csub.add_parser("list", help="the shipped config names (run configs, then model sizes and tasks)")
    q.set_defaults(run=run_list)
    q = csub.add_parser("show", help="a config (name or path) with includes merged and overrides applied, as YAML")
    q.add_argument("name", help="shipped config name (see `config list`) or YAML path")
    q.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    q.set_defaults(run=run_show)
