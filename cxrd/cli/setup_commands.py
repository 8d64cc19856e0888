"""``cxrctl accept-eula``, ``install``, ``uninstall``, ``doctor``: setting CloudXR up.

Each imports what it works with when it runs, so other commands start without it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrd.cli.common import Out, config_from_args, instance_from_args, isatty
from cxrd.errors import EulaNotAccepted


def cmd_accept_eula(args: argparse.Namespace) -> int:
    from cxrd.system import eula

    install_path = config_from_args(args).install_path
    out = Out(sys.stdout)
    if eula.is_accepted(install_path):
        out.line(f"The NVIDIA CloudXR EULA is already accepted ({eula.marker_path(install_path)}).")
        return 0
    out.line(eula.NOTICE)
    if not args.yes:
        if not isatty(sys.stdin):
            raise EulaNotAccepted(
                "not accepted: no terminal to ask on; pass --yes to accept non-interactively"
            )
        try:
            answer = input(eula.PROMPT)
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise EulaNotAccepted("not accepted")
    marker = eula.accept(install_path)
    out.line(f"Accepted; recorded in {marker}.")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from cxrd.cli import install

    prefix = Path(args.system_prefix) if args.system_prefix else None
    instance = instance_from_args(args)
    written = install.install(prefix, instances=[instance], force=args.force)
    out = Out(sys.stdout)
    for path in written:
        out.line(f"wrote {path}")
    for note in written.notes:
        out.line(note)
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from cxrd.cli import install

    prefix = Path(args.system_prefix) if args.system_prefix else None
    removed = install.uninstall(prefix, instance=instance_from_args(args))
    out = Out(sys.stdout)
    for path in removed:
        out.line(f"removed {path}")
    if not removed:
        out.line("nothing to remove")
    for note in removed.notes:
        out.line(note)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from cxrd.cli import doctor

    checks = doctor.run_checks(config_from_args(args))
    out = Out(sys.stdout)
    colors = {"ok": "32", "warn": "33", "fail": "31"}
    for check in checks:
        level = out.paint(check.level.ljust(4), "1;" + colors.get(check.level, "0"))
        out.line(f"{level} {check.name}: {check.message}")
        if check.fix and check.level != "ok":
            out.line(f"     fix: {check.fix}")
    return 1 if any(check.level == "fail" for check in checks) else 0
