"""``cxrctl instances``: every configured or running instance, one line (or object) each."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, dataclass

from cxrd import instances
from cxrd.cli.common import Out
from cxrd.client import AsyncCloudXRClient
from cxrd.config import load_config
from cxrd.errors import CxrdError, NotRunning
from cxrd.instances import Instance


@dataclass(frozen=True)
class Row:
    name: str  # "" is the unnamed instance
    state: str  # the daemon's state, or "inactive"
    profile: str
    gpu: int | None
    proxy_port: int | None  # None: the proxy is disabled
    signaling_port: int
    pid: int  # the runtime's; 0 when not running
    url: str  # what a headset opens; "" when not running
    error: str = ""  # why the config could not be read, for an instance that is down


def cmd_instances(args: argparse.Namespace) -> int:
    rows = asyncio.run(_gather())
    out = Out(sys.stdout)
    if args.json:
        out.line(json.dumps([asdict(row) for row in rows], indent=2))
        return 0
    header = ("INSTANCE", "STATE", "PROFILE", "GPU", "PROXY", "SIGNALING", "PID", "URL")
    table = [header] + [
        (
            Instance(row.name).label,
            row.state,
            row.profile,
            "-" if row.gpu is None else str(row.gpu),
            "-" if row.proxy_port is None else str(row.proxy_port),
            str(row.signaling_port),
            str(row.pid or "-"),
            row.url or row.error or "-",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        out.line(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
    return 0


async def _gather() -> list[Row]:
    async with AsyncCloudXRClient(instance="") as probe:
        running = await probe.running_instances()
    wanted = sorted(set(instances.configured()) | set(running))
    return list(await asyncio.gather(*(_row(instance) for instance in wanted)))


async def _row(instance: Instance) -> Row:
    try:
        async with AsyncCloudXRClient(instance=instance.name) as client:
            snap = await client.status()
    except NotRunning:
        return _configured_row(instance)
    return Row(
        name=instance.name,
        state=str(snap.state),
        profile=snap.device_profile,
        gpu=snap.gpu if snap.gpu >= 0 else None,
        proxy_port=snap.proxy.port or None,
        signaling_port=snap.signaling_port,
        pid=snap.runtime.pid,
        url=snap.proxy.url,
    )


def _configured_row(instance: Instance) -> Row:
    try:
        config = load_config(instance=instance.name)
    except CxrdError as err:
        return Row(instance.name, "inactive", "", None, None, 0, 0, "", error=str(err))
    return Row(
        name=instance.name,
        state="inactive",
        profile=config.runtime.device_profile,
        gpu=config.runtime.gpu,
        proxy_port=config.proxy.port if config.proxy.enabled else None,
        signaling_port=config.runtime.signaling_port,
        pid=0,
        url="",
    )
