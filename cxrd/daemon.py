"""``cxrd``: the composition root. Builds config, ports, bus and signals, then runs.

Always in the foreground: no double fork, no pid file. Nothing else in the
package wires parts together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrd import __version__
from cxrd.config import BACKENDS, Config, load_config
from cxrd.core.supervisor import Supervisor
from cxrd.errors import AlreadyServing, CxrdError, InvalidConfig, StartFailed
from cxrd.instances import Instance
from cxrd.system.host import SystemHost, SystemReadiness
from cxrd.system.notify import SdNotifier
from cxrd.system.process import ProcessLauncher
from cxrd.system.rundir import InstallLock

if TYPE_CHECKING:
    from cxrd.dbus.service import DBusService

log = logging.getLogger("cxrd")

_PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """``<N>`` syslog priority on every line: journald maps it to the entry's level."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITIES.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd handed us (JOURNAL_STREAM=dev:ino)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        # journald adds the timestamp; the prefix carries the priority.
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose < 2:
        # dbus-fast and websockets are chatty at DEBUG.
        for noisy in ("dbus_fast", "websockets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cxrd",
        description="Run the NVIDIA CloudXR runtime and its WSS proxy as a supervised service.",
    )
    p.add_argument(
        "--instance",
        default="",
        metavar="NAME",
        help="a named instance: ~/.config/cxrd/NAME.toml, ~/.cloudxr-NAME, its own bus name",
    )
    p.add_argument("--config", type=Path, help="config file (default: ~/.config/cxrd/cxrd.toml)")
    p.add_argument("--runtime", choices=BACKENDS, help="runtime backend (runtime.backend)")
    p.add_argument("--install-dir", help="install dir (install_dir; default ~/.cloudxr)")
    p.add_argument("--profile", help="device profile (runtime.device_profile)")
    p.add_argument("--proxy-port", type=int, help="WSS proxy port (proxy.port)")
    p.add_argument(
        "--signaling-port",
        "--backend-port",
        type=int,
        help="runtime signaling port, where the proxy forwards (runtime.signaling_port)",
    )
    p.add_argument("--media-port", type=int, help="runtime media port, UDP (runtime.media_port)")
    p.add_argument("--gpu", type=int, help="CUDA device index of the runtime (runtime.gpu)")
    p.add_argument("--no-proxy", action="store_true", help="run the runtime without the proxy")
    p.add_argument(
        "--env-file", type=Path, help="isaacteleop-style KEY=value overrides for the runtime"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.add_argument("--version", action="version", version=f"cxrd {__version__}")
    return p.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "runtime.backend": args.runtime,
        "install_dir": args.install_dir,
        "runtime.device_profile": args.profile,
        "proxy.port": args.proxy_port,
        "runtime.signaling_port": args.signaling_port,
        "runtime.media_port": args.media_port,
        "runtime.gpu": args.gpu,
        "proxy.enabled": False if args.no_proxy else None,
    }


def read_config(args: argparse.Namespace) -> Config:
    return load_config(
        args.config,
        instance=args.instance,
        env_file=args.env_file,
        overrides=overrides_from(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose + 1)
    try:
        config = read_config(args)
    except InvalidConfig as err:
        log.error("%s", err)
        SdNotifier().notify(f"STATUS=Invalid configuration: {err}")
        return err.exit_code
    log.info(
        "cxrd %s: instance %s, %s runtime, install dir %s",
        __version__,
        Instance(config.instance).label,
        config.runtime.backend,
        config.install_path,
    )
    return asyncio.run(run(config, args))


async def run(config: Config, args: argparse.Namespace) -> int:
    notifier = SdNotifier()
    try:
        lock = InstallLock(config.run_dir)
    except CxrdError as err:
        # The run dir is another daemon's, or unusable: record nothing there.
        log.error("%s", err)
        notifier.notify(f"STATUS=Not started: {err}")
        return err.exit_code
    launcher = ProcessLauncher()
    supervisor = Supervisor(
        config,
        launcher=launcher,
        notifier=notifier,
        readiness=SystemReadiness(),
        host=SystemHost(),
    )
    loop = asyncio.get_running_loop()
    background: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    controller = asyncio.create_task(supervisor.run(), name="cxrd-supervisor")
    # The runtime first: the slow rest (D-Bus, the proxy's certificate) happens
    # while it comes up.
    spawn(_launch(supervisor))
    loop.add_signal_handler(signal.SIGTERM, supervisor.request_stop, "SIGTERM received")
    loop.add_signal_handler(signal.SIGINT, supervisor.request_stop, "SIGINT received")
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(_reload(supervisor, args)))
    if os.environ.get("CXRD_TEST_HOOKS") == "1":
        # Test hook for the watchdog: a wedged event loop.
        loop.add_signal_handler(signal.SIGUSR2, time.sleep, 3600)
    interval = notifier.watchdog_interval()
    if interval is not None:
        spawn(_watchdog(notifier, interval))
    service: DBusService | None = None
    try:
        try:
            service = await _serve_bus(supervisor, Instance(config.instance).bus_name)
        except AlreadyServing as err:
            supervisor.fail(err)
        except StartFailed as err:
            log.error("%s; running without D-Bus", err)
        if service is not None:
            spawn(_stop_when_bus_lost(supervisor, service))
        code = await controller
        log.info("cxrd exits with code %d", code)
        return code
    finally:
        for task in background:
            task.cancel()
        if not controller.done():
            supervisor.request_stop("the daemon is ending")
            with contextlib.suppress(Exception):
                await controller
        if service is not None:
            await service.close()
        launcher.close()
        lock.release()


async def _stop_when_bus_lost(supervisor: Supervisor, service: DBusService) -> None:
    # Nobody can reach or stop us any more; the session is most likely ending.
    await service.wait_disconnected()
    supervisor.request_stop("the session bus connection was lost")


async def _launch(supervisor: Supervisor) -> None:
    # A failed start ends in run() with the error's exit code.
    with contextlib.suppress(CxrdError):
        await supervisor.launch()


async def _reload(supervisor: Supervisor, args: argparse.Namespace) -> None:
    log.info("SIGHUP: re-reading the configuration")
    # Applied or refused, the supervisor logs it and tells systemd (READY=1).
    with contextlib.suppress(CxrdError):
        await supervisor.reload(lambda: read_config(args))


async def _watchdog(notifier: SdNotifier, interval: float) -> None:
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def _serve_bus(supervisor: Supervisor, bus_name: str) -> DBusService | None:
    # Imported here: dbus-fast loads while the runtime is already coming up.
    from cxrd.dbus.connection import session_bus_address
    from cxrd.dbus.service import serve_dbus

    address = session_bus_address()
    if address is None:
        log.warning("no session bus: running without D-Bus (cxrctl and clients cannot reach us)")
        return None
    return await serve_dbus(supervisor, bus_address=address, bus_name=bus_name)


if __name__ == "__main__":
    sys.exit(main())
