"""``cxrctl``: the person's way in (DESIGN §7). The only module that prints.

Exit codes: a failed command exits with its error's ``exit_code`` (see
:mod:`cxrd.errors`: 3 not running, 10 start failed, 11 timeout, 13 EULA...).
``cxrctl status`` answers like ``systemctl is-active``:

  0  ready
  1  on the way (starting, restarting, stopping)
  3  not running (the last failure, if any, is shown)
  4  failed (the daemon gave up and is about to exit)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

from cxrd import __version__
from cxrd import constants as C
from cxrd.client import AsyncCloudXRClient
from cxrd.config import Config, load_config
from cxrd.core.snapshot import Snapshot
from cxrd.core.states import State
from cxrd.errors import CxrdError, EulaNotAccepted, InvalidArgs, NotRunning
from cxrd.system.rundir import read_last_error

_T = TypeVar("_T")

EXIT_READY = 0
EXIT_TRANSITION = 1
EXIT_NOT_RUNNING = 3
EXIT_FAILED = 4
DEFAULT_WAIT = 90.0  # seconds `cxrctl wait` waits when not told
_STATUS_EXIT = {
    State.READY: EXIT_READY,
    State.STARTING: EXIT_TRANSITION,
    State.RESTARTING: EXIT_TRANSITION,
    State.STOPPING: EXIT_TRANSITION,
    State.STOPPED: EXIT_NOT_RUNNING,
    State.FAILED: EXIT_FAILED,
}


# --- presentation -----------------------------------------------------------------


class Out:
    """Colour only for a terminal, and never with NO_COLOR (https://no-color.org)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = _isatty(stream)
        self.color = self.tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_STATE_COLOR = {
    State.READY: "32",
    State.STARTING: "33",
    State.RESTARTING: "33",
    State.STOPPING: "33",
    State.STOPPED: "90",
    State.FAILED: "31",
}


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if hours or days:
        parts.append(f"{hours}h")
    if minutes or hours or days:
        parts.append(f"{minutes}min")
    parts.append(f"{secs}s")
    return " ".join(parts)


def _report_error(err: CxrdError) -> int:
    err_out = Out(sys.stderr)
    err_out.line(f"{err_out.paint('cxrctl: error:', '1;31')} {err}")
    if err.hint:
        err_out.line(f"{err_out.paint('hint:', '1')} {err.hint}")
    return err.exit_code


# --- the commands -------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    overrides = {"install_dir": args.install_dir} if args.install_dir else None
    return load_config(args.config, overrides=overrides)


def _with_client(fn: Callable[[AsyncCloudXRClient], Coroutine[Any, Any, _T]]) -> _T:
    """Run ``fn`` with a client connected for it, on a loop of its own."""

    async def call() -> _T:
        async with AsyncCloudXRClient() as client:
            return await fn(client)

    return asyncio.run(call())


def cmd_status(args: argparse.Namespace) -> int:
    async def ask(client: AsyncCloudXRClient) -> int:
        snap = await client.status()
        _print_status(snap, args.json)
        return _STATUS_EXIT.get(snap.state, EXIT_TRANSITION)

    try:
        return _with_client(ask)
    except NotRunning as err:
        _print_down(args, str(err))
        return EXIT_NOT_RUNNING


def _print_status(snap: Snapshot, as_json: bool) -> None:
    out = Out(sys.stdout)
    if as_json:
        out.line(json.dumps(_snapshot_json(snap), indent=2, sort_keys=True))
        return
    dot = out.paint("●", _STATE_COLOR.get(snap.state, "0"))
    state = out.paint(str(snap.state), "1;" + _STATE_COLOR.get(snap.state, "0"))
    backend = (
        "sim: a simulated runtime, not NVIDIA CloudXR"
        if snap.backend == "sim"
        else (f"{snap.backend} runtime")
    )
    out.line(f"{dot} cxrd {snap.version} — {state} ({backend})")
    rows: list[tuple[str, str]] = []
    if snap.runtime.pid:
        up = time.time() - snap.runtime.started_at if snap.runtime.started_at else 0.0
        rows.append(("Runtime", f"pid {snap.runtime.pid}, up {_duration(up)}"))
    else:
        rows.append(("Runtime", "not running"))
    rows.append(("Restarts", str(snap.runtime.restarts)))
    if snap.runtime.last_exit:
        rows.append(("Last exit", snap.runtime.last_exit))
    if snap.proxy.url or snap.proxy.pid:
        rows.append(("Proxy", f"{snap.proxy.url or '-'} (pid {snap.proxy.pid or '-'})"))
    rows.append(("Profile", snap.device_profile))
    rows.append(("Env file", snap.env_file))
    rows.append(("Install dir", snap.install_dir))
    rows.append(("Daemon up", _duration(snap.uptime)))
    for lease in snap.leases:
        who = f"{lease.holder} pid {lease.pid or '?'}"
        rows.append(("Lease", f"{lease.id} {who} {lease.reason!r}".rstrip()))
    if snap.last_error:
        rows.append(("Last error", out.paint(snap.last_error, "31")))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        out.line(f"  {label.rjust(width)}: {value}")


def _snapshot_json(snap: Snapshot) -> dict[str, Any]:
    """The snapshot as it is, field by field (``state`` is a str enum, so JSON shows its value)."""
    return {"running": True, **dataclasses.asdict(snap)}


def _print_down(args: argparse.Namespace, why: str) -> None:
    out = Out(sys.stdout)
    last: dict[str, object] | None = None
    note = ""
    try:
        config = _config(args)
    except CxrdError as err:
        note = f"(cannot read the config to find the last error: {err})"
    else:
        last = read_last_error(config.run_dir)
    if args.json:
        out.line(
            json.dumps(
                {"running": False, "state": "inactive", "detail": why, "last_error": last},
                indent=2,
                sort_keys=True,
            )
        )
        return
    out.line(f"{out.paint('○', '90')} cxrd — {out.paint('inactive', '1')} (not running)")
    if last is not None:
        out.line(
            f"  Last failure ({last.get('when', '?')}): {out.paint(str(last.get('error')), '31')}"
        )
        tail = str(last.get("stderr_tail") or "").rstrip()
        if tail:
            out.line("  Runtime stderr (tail):")
            for line in tail.splitlines()[-10:]:
                out.line(f"    {line}")
    if note:
        out.line(f"  {note}")


def cmd_start(args: argparse.Namespace) -> int:
    if args.no_block:

        async def request(client: AsyncCloudXRClient) -> int:
            client.start_no_block(device_profile=args.profile)
            # One round trip after it, so the request has left before we disconnect.
            await client.is_running()
            Out(sys.stdout).line("start requested; `cxrctl wait` waits until ready")
            return 0

        return _with_client(request)

    async def start(client: AsyncCloudXRClient) -> int:
        coro = client.start(timeout=args.timeout, device_profile=args.profile)
        snap, elapsed = await _with_progress("Starting CloudXR", coro)
        _print_ready(snap, f"ready in {elapsed:.1f} s")
        return 0

    return _with_client(start)


def cmd_restart(args: argparse.Namespace) -> int:
    async def restart(client: AsyncCloudXRClient) -> int:
        coro = client.restart(timeout=args.timeout, device_profile=args.profile)
        snap, elapsed = await _with_progress("Restarting CloudXR", coro)
        _print_ready(snap, f"restarted in {elapsed:.1f} s")
        return 0

    return _with_client(restart)


def cmd_wait(args: argparse.Namespace) -> int:
    async def wait(client: AsyncCloudXRClient) -> int:
        coro = client.wait_ready(args.timeout)
        snap, elapsed = await _with_progress("Waiting for CloudXR", coro)
        _print_ready(snap, f"ready after {elapsed:.1f} s")
        return 0

    return _with_client(wait)


def cmd_stop(args: argparse.Namespace) -> int:
    async def stop(client: AsyncCloudXRClient) -> int:
        was_running = await client.stop(timeout=args.timeout)
        Out(sys.stdout).line("stopped" if was_running else "not running")
        return 0

    try:
        return _with_client(stop)
    except NotRunning:
        Out(sys.stdout).line("not running")
        return 0


async def _with_progress(what: str, coro: Coroutine[Any, Any, Snapshot]) -> tuple[Snapshot, float]:
    """Await ``coro``; on a terminal, redraw one line with the elapsed time meanwhile."""
    began = time.monotonic()
    err = Out(sys.stderr)
    if not err.tty:
        return await coro, time.monotonic() - began
    task = asyncio.ensure_future(coro)
    try:
        while not task.done():
            elapsed = time.monotonic() - began
            err.stream.write(f"\r\033[K{what}… {elapsed:.1f} s")
            err.stream.flush()
            await asyncio.wait({task}, timeout=0.1)
    finally:
        err.stream.write("\r\033[K")
        err.stream.flush()
        if not task.done():
            task.cancel()
    return task.result(), time.monotonic() - began


def _print_ready(snap: Snapshot, words: str) -> None:
    out = Out(sys.stdout)
    out.line(
        f"{out.paint('●', '32')} CloudXR {words} (pid {snap.runtime.pid}, {snap.device_profile})"
    )
    if snap.proxy.url:
        out.line(f"  proxy: {snap.proxy.url}")
    out.line(f'  env:   {snap.env_file}  (eval "$(cxrctl env)")')


def cmd_env(args: argparse.Namespace) -> int:
    async def env(client: AsyncCloudXRClient) -> int:
        values = await client.environment()
        if not values:
            raise NotRunning("the runtime is not running, so it has no environment")
        Out(sys.stdout).line(format_env(values, args.shell))
        return 0

    return _with_client(env)


def format_env(env: dict[str, str], shell: str) -> str:
    """Text that a shell evaluates into the runtime's environment."""
    if shell == "json":
        return json.dumps(env, indent=2, sort_keys=True)
    if shell == "fish":
        return "\n".join(
            f"set -gx {key} {_fish_quote(value)};" for key, value in sorted(env.items())
        )
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items()))


def _fish_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def cmd_logs(args: argparse.Namespace) -> int:
    if args.which == "daemon":
        return _daemon_logs(args)
    files = _log_files(args)
    if not files:
        raise NotRunning("no log files yet (has cxrd ever run with this install dir?)")
    if args.follow:
        tail = shutil.which("tail")
        if tail is None:
            raise InvalidArgs("`logs -f` needs the `tail` program")
        sys.stdout.flush()
        os.execv(tail, ["tail", "-n", str(args.lines), "-F", *map(str, files)])
    out = Out(sys.stdout)
    for index, path in enumerate(files):
        if len(files) > 1:
            out.line(("\n" if index else "") + out.paint(f"==> {path} <==", "1"))
        for line in _last_lines(path, args.lines):
            out.line(line)
    return 0


def _log_files(args: argparse.Namespace) -> list[Path]:
    logs: dict[str, str] = {}
    with contextlib.suppress(CxrdError):
        logs = dict(_run_snapshot_logs())
    if not logs:
        config = _config(args)
        found = {
            "runtime": config.logs_dir / C.RUNTIME_STDERR_LOG,
            "proxy": config.logs_dir / C.PROXY_LOG,
        }
        servers = sorted(config.logs_dir.glob(C.SERVER_LOG_GLOB), key=_mtime)
        if servers:
            found["server"] = servers[-1]
        logs = {key: str(path) for key, path in found.items() if path.exists()}
    wanted = {"runtime": ("runtime", "server"), "proxy": ("proxy",)}.get(
        args.which, ("runtime", "server", "proxy")
    )
    return [Path(logs[key]) for key in wanted if key in logs]


def _run_snapshot_logs() -> dict[str, str]:
    async def logs(client: AsyncCloudXRClient) -> dict[str, str]:
        return dict((await client.status()).logs)

    return _with_client(logs)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _last_lines(path: Path, count: int) -> list[str]:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            block = min(size, max(4096, count * 200))
            while True:
                handle.seek(size - block)
                data = handle.read(block)
                if data.count(b"\n") > count or block == size:
                    break
                block = min(size, block * 2)
    except OSError as exc:
        return [f"(cannot read {path}: {exc.strerror})"]
    lines = data.decode(errors="replace").splitlines()
    return lines[-count:] if count > 0 else []


def _daemon_logs(args: argparse.Namespace) -> int:
    journalctl = shutil.which("journalctl")
    if journalctl is None or not Path("/run/systemd/journal").is_dir():
        raise NotRunning(
            "there is no systemd journal here; a cxrd run outside systemd logs to its stderr"
        )
    argv = [journalctl, "--user", "-u", C.UNIT_NAME, "-n", str(args.lines), "--no-pager"]
    if args.follow:
        argv.append("-f")
    sys.stdout.flush()
    os.execv(journalctl, argv)


def cmd_accept_eula(args: argparse.Namespace) -> int:
    from cxrd.system import eula

    install_path = _config(args).install_path
    out = Out(sys.stdout)
    if eula.is_accepted(install_path):
        out.line(f"The NVIDIA CloudXR EULA is already accepted ({eula.marker_path(install_path)}).")
        return 0
    out.line(eula.NOTICE)
    if not args.yes:
        if not _isatty(sys.stdin):
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
    written = install.install(prefix, force=args.force)
    out = Out(sys.stdout)
    for path in written:
        out.line(f"wrote {path}")
    for note in written.notes:
        out.line(note)
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from cxrd.cli import install

    prefix = Path(args.system_prefix) if args.system_prefix else None
    removed = install.uninstall(prefix)
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

    checks = doctor.run_checks(_config(args))
    out = Out(sys.stdout)
    colors = {"ok": "32", "warn": "33", "fail": "31"}
    for check in checks:
        level = out.paint(check.level.ljust(4), "1;" + colors.get(check.level, "0"))
        out.line(f"{level} {check.name}: {check.message}")
        if check.fix and check.level != "ok":
            out.line(f"     fix: {check.fix}")
    return 1 if any(check.level == "fail" for check in checks) else 0


# --- arguments ------------------------------------------------------------------------


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

    p = add("start", cmd_start, "start the runtime (activating the daemon) and wait until ready")
    p.add_argument("--no-block", action="store_true", help="ask for a start and return at once")
    p.add_argument("--timeout", type=_positive, help="seconds to wait (the start goes on after)")
    p.add_argument("--profile", help="device profile (NV_DEVICE_PROFILE) the runtime must have")

    p = add("stop", cmd_stop, "stop the runtime, the proxy and the daemon")
    p.add_argument("--timeout", type=_positive, default=60.0, help="seconds to wait for the exit")

    p = add("restart", cmd_restart, "stop and start the runtime and the proxy")
    p.add_argument("--timeout", type=_positive, help="seconds to wait for ready")
    p.add_argument("--profile", help="device profile for the new runtime")

    p = add("wait", cmd_wait, "wait until the runtime is ready, without starting it")
    p.add_argument("--timeout", type=_positive, default=DEFAULT_WAIT, help="seconds (default 90)")

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

    add("doctor", cmd_doctor, "check what running CloudXR needs, and say how to fix it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CxrdError as err:
        return _report_error(err)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `cxrctl logs | head`: the reader left; not an error worth a traceback.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
