"""``cxrctl logs``: the runtime's and the proxy's log files, or the daemon's journal."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

from cxrd import constants as C
from cxrd.cli.common import Out, config_from_args, instance_from_args, with_client
from cxrd.client import AsyncCloudXRClient
from cxrd.errors import CxrdError, InvalidArgs, NotRunning


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
        logs = dict(_run_snapshot_logs(args))
    if not logs:
        config = config_from_args(args)
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


def _run_snapshot_logs(args: argparse.Namespace) -> dict[str, str]:
    async def logs(client: AsyncCloudXRClient) -> dict[str, str]:
        return dict((await client.status()).logs)

    return with_client(args, logs)


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
    unit = instance_from_args(args).unit
    argv = [journalctl, "--user", "-u", unit, "-n", str(args.lines), "--no-pager"]
    if args.follow:
        argv.append("-f")
    sys.stdout.flush()
    os.execv(journalctl, argv)
