"""``cxrctl``: the person's way in (DESIGN §7): the parser and the dispatch.

The ``cxrd.cli`` package is the only one that prints. A failed command exits
with its error's ``exit_code`` (see :mod:`cxrd.errors`: 3 not running, 10
start failed, 11 timeout, 13 EULA...); ``cxrctl status`` has codes of its own
(:mod:`cxrd.cli.status`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cxrd import __version__
from cxrd.cli.assets import cmd_cert, cmd_client
from cxrd.cli.common import Out
from cxrd.cli.instances import cmd_instances
from cxrd.cli.lifecycle import (
    add_choice_arguments,
    cmd_restart,
    cmd_start,
    cmd_stop,
    cmd_wait,
)
from cxrd.cli.logs import cmd_logs
from cxrd.cli.run import EXIT_CXRD, cmd_run
from cxrd.cli.setup_commands import cmd_accept_eula, cmd_doctor, cmd_install, cmd_uninstall
from cxrd.cli.status import cmd_env, cmd_status
from cxrd.cli.urls import cmd_url
from cxrd.errors import CxrdError


def _report_error(err: CxrdError) -> int:
    err_out = Out(sys.stderr)
    err_out.line(f"{err_out.paint('cxrctl: error:', '1;31')} {err}")
    if err.hint:
        err_out.line(f"{err_out.paint('hint:', '1')} {err.hint}")
    return err.exit_code


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    def common_flags(default: Any) -> argparse.ArgumentParser:
        # Before or after the command; SUPPRESS keeps a subcommand's default
        # from overwriting what was given before it.
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument(
            "-i",
            "--instance",
            metavar="NAME",
            default=default,
            help="a named instance (default $CXRD_INSTANCE, else the unnamed one)",
        )
        common.add_argument(
            "--config",
            type=Path,
            default=default,
            help="cxrd.toml (default ~/.config/cxrd/cxrd.toml)",
        )
        common.add_argument(
            "--install-dir", default=default, help="install dir, to find files while cxrd is down"
        )
        return common

    common = common_flags(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="cxrctl",
        parents=[common_flags(None)],
        description="Control cxrd, the per-user CloudXR runtime service.",
        epilog="status exits 0 ready, 1 starting/restarting/stopping, 3 not running, 4 failed.",
    )
    parser.add_argument("--version", action="version", version=f"cxrctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[common], help=text, description=text)
        command.set_defaults(func=fn)
        return command

    p = add("status", cmd_status, "show the daemon's state; never starts it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--health",
        metavar="URL",
        help="without D-Bus, ask this health endpoint (http://host:port; default health.listen)",
    )

    p = add("instances", cmd_instances, "list every configured or running instance")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("start", cmd_start, "start the runtime (activating the daemon) and wait until ready")
    p.add_argument("--no-block", action="store_true", help="ask for a start and return at once")
    p.add_argument("--timeout", type=_positive, help="seconds to wait (the start goes on after)")
    add_choice_arguments(p)

    p = add("stop", cmd_stop, "stop the runtime, the proxy and the daemon")
    p.add_argument("--timeout", type=_positive, default=60.0, help="seconds to wait for the exit")

    p = add("restart", cmd_restart, "stop and start the runtime and the proxy")
    p.add_argument("--timeout", type=_positive, help="seconds to wait for ready")
    add_choice_arguments(p)

    p = add("wait", cmd_wait, "wait until the runtime is ready, without starting it")
    p.add_argument(
        "--timeout", type=_positive, help="seconds (default 90; with --headset: no limit)"
    )
    p.add_argument(
        "--headset", action="store_true", help="wait until a headset is connected (3 on timeout)"
    )

    p = add("run", cmd_run, "run COMMAND on the runtime, leased for its life, with its environment")
    p.set_defaults(error_exit=EXIT_CXRD)  # a CxrdError: 125, as env(1) exits for its own
    add_choice_arguments(p)
    p.add_argument(
        "--timeout",
        type=_positive,
        help="seconds to wait for ready (default runtime.startup_timeout)",
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND [ARGS...]",
        help="exits with COMMAND's status; 125 cxrd's error, 126 not runnable, 127 not found",
    )

    p = add("url", cmd_url, "print the URLs to open on a headset (certificate page, web client)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--qr", action="store_true", help="draw the web client's URL as a QR code")

    p = add("env", cmd_env, 'print the runtime\'s environment: eval "$(cxrctl env)"')
    p.add_argument("--shell", choices=("sh", "fish", "json"), default="sh")

    p = add("logs", cmd_logs, "show the runtime's, the proxy's or the daemon's log")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=50, help="lines from the end (default 50)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--runtime", dest="which", action="store_const", const="runtime")
    which.add_argument("--proxy", dest="which", action="store_const", const="proxy")
    which.add_argument("--daemon", dest="which", action="store_const", const="daemon")

    p = add("accept-eula", cmd_accept_eula, "read and accept the NVIDIA CloudXR EULA")
    p.add_argument("--yes", action="store_true", help="accept without asking (scripts)")

    for name, fn, text in (
        ("install", cmd_install, "install the systemd user unit and the D-Bus activation file"),
        ("uninstall", cmd_uninstall, "remove what `cxrctl install` wrote"),
    ):
        p = add(name, fn, text)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--user", action="store_true", help="for this user (the default)")
        where.add_argument("--system-prefix", metavar="DIR", help="for every user, e.g. /usr/local")
        if name == "install":
            p.add_argument("--force", action="store_true", help="replace files cxrd did not write")

    p = add("cert", cmd_cert, "renew the proxy's generated certificate")
    p.add_argument("action", choices=("renew",))

    p = add("client", cmd_client, "put the CloudXR web client where the proxy serves it")
    p.add_argument("action", choices=("fetch",))
    p.add_argument(
        "--from",
        dest="source",
        metavar="URL|DIR",
        help="another base URL, or a directory (default: the build for the installed runtime)",
    )
    p.add_argument("--force", action="store_true", help="replace a client already there")
    p.add_argument(
        "--timeout", type=_positive, default=120.0, help="seconds for the whole fetch (default 120)"
    )

    add("doctor", cmd_doctor, "check what running CloudXR needs, and say how to fix it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CxrdError as err:
        code = _report_error(err)
        return int(getattr(args, "error_exit", code))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `cxrctl logs | head`: the reader left; not an error worth a traceback.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
