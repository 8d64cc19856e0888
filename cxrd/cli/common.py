"""What every ``cxrctl`` command shares: terminal output, the config, a client."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TextIO, TypeVar

from cxrd.client import AsyncCloudXRClient
from cxrd.config import Config, load_config
from cxrd.instances import Instance

_T = TypeVar("_T")


class Out:
    """Colour only for a terminal, and never with NO_COLOR (https://no-color.org)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = isatty(stream)
        self.color = self.tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)


def isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def instance_from_args(args: argparse.Namespace) -> Instance:
    """``-i/--instance``, else ``$CXRD_INSTANCE``, else the unnamed instance."""
    return Instance.selected(getattr(args, "instance", None))


def config_from_args(args: argparse.Namespace) -> Config:
    """The config that ``--instance``, ``--config`` and ``--install-dir`` name."""
    overrides = {"install_dir": args.install_dir} if args.install_dir else None
    instance = instance_from_args(args)
    return load_config(args.config, instance=instance.name, overrides=overrides)


def with_client(
    args: argparse.Namespace, fn: Callable[[AsyncCloudXRClient], Coroutine[Any, Any, _T]]
) -> _T:
    """Run ``fn`` with a client of the selected instance, on a loop of its own."""
    instance = instance_from_args(args)

    async def call() -> _T:
        async with AsyncCloudXRClient(instance=instance.name) as client:
            return await fn(client)

    return asyncio.run(call())
