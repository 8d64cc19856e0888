"""``cxrctl start``, ``restart``, ``wait`` and ``stop``: the daemon's lifecycle, with progress."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from cxrd.cli.common import Out, with_client
from cxrd.cli.urls import describe_agent
from cxrd.client import AsyncCloudXRClient
from cxrd.config import parse_env_file
from cxrd.core.choice import Choice
from cxrd.core.snapshot import Snapshot
from cxrd.errors import NotRunning, Timeout

DEFAULT_WAIT = 90.0  # seconds `cxrctl wait` waits for ready when not told
EXIT_NO_HEADSET = 3  # `cxrctl wait --headset`: none came in time


def add_choice_arguments(p: argparse.ArgumentParser) -> None:
    """--profile, --env-file, --gpu: what the runtime should run with (Start's options)."""
    p.add_argument("--profile", help="device profile (NV_DEVICE_PROFILE) the runtime must have")
    p.add_argument(
        "--env-file",
        type=Path,
        metavar="FILE",
        help="an isaacteleop KEY=value file (Isaac Lab's cloudxrjs-cloudxr.env, ...): "
        "the profile, GPU and env the runtime must have",
    )
    p.add_argument(
        "--gpu",
        type=int,
        metavar="N",
        help="CUDA index of the runtime's GPU (NV_CXR_GPU_INDEX_CUDA)",
    )


def requested_choice(args: argparse.Namespace) -> Choice:
    """The settings of :func:`add_choice_arguments`: the flags beat the env file's keys."""
    values = parse_env_file(args.env_file) if args.env_file is not None else {}
    from_file = Choice.from_env(values)
    return Choice(
        profile=args.profile if args.profile is not None else from_file.profile,
        env=from_file.env,
        gpu=args.gpu if args.gpu is not None else from_file.gpu,
    )


def cmd_start(args: argparse.Namespace) -> int:
    if args.no_block:

        async def request(client: AsyncCloudXRClient) -> int:
            client.start_no_block(device_profile=args.profile)
            # One round trip after it, so the request has left before we disconnect.
            await client.is_running()
            Out(sys.stdout).line("start requested; `cxrctl wait` waits until ready")
            return 0

        return with_client(args, request)

    choice = requested_choice(args)

    async def start(client: AsyncCloudXRClient) -> int:
        coro = client.start(
            timeout=args.timeout, device_profile=choice.profile, env=choice.env, gpu=choice.gpu
        )
        snap, elapsed = await _with_progress("Starting CloudXR", coro)
        _print_ready(snap, f"ready in {elapsed:.1f} s")
        return 0

    return with_client(args, start)


def cmd_restart(args: argparse.Namespace) -> int:
    choice = requested_choice(args)

    async def restart(client: AsyncCloudXRClient) -> int:
        coro = client.restart(
            timeout=args.timeout, device_profile=choice.profile, env=choice.env, gpu=choice.gpu
        )
        snap, elapsed = await _with_progress("Restarting CloudXR", coro)
        _print_ready(snap, f"restarted in {elapsed:.1f} s")
        return 0

    return with_client(args, restart)


def cmd_wait(args: argparse.Namespace) -> int:
    if args.headset:
        return _wait_headset(args, args.timeout)

    async def wait(client: AsyncCloudXRClient) -> int:
        coro = client.wait_ready(args.timeout or DEFAULT_WAIT)
        snap, elapsed = await _with_progress("Waiting for CloudXR", coro)
        _print_ready(snap, f"ready after {elapsed:.1f} s")
        return 0

    return with_client(args, wait)


def _wait_headset(args: argparse.Namespace, timeout: float | None) -> int:
    """Exit 0 once a headset is connected, 3 when none comes within ``timeout``."""

    async def wait(client: AsyncCloudXRClient) -> int:
        headset = await client.wait_for_headset(timeout)
        Out(sys.stdout).line(
            f"headset connected: {headset.address} {describe_agent(headset.user_agent)}"
        )
        return 0

    try:
        return with_client(args, wait)
    except Timeout as err:
        Out(sys.stderr).line(f"cxrctl: {err}")
        return EXIT_NO_HEADSET


def cmd_stop(args: argparse.Namespace) -> int:
    async def stop(client: AsyncCloudXRClient) -> int:
        was_running = await client.stop(timeout=args.timeout)
        Out(sys.stdout).line("stopped" if was_running else "not running")
        return 0

    try:
        return with_client(args, stop)
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
        out.line(f"  web client: {snap.proxy.url}  (`cxrctl url` lists every address)")
    out.line(f'  env:   {snap.env_file}  (eval "$(cxrctl env)")')
