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
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrd import __version__
from cxrd.__main__ import HELD_SIGNALS
from cxrd.config import BACKENDS, BUS_MODES, Config, load_config
from cxrd.core.faults import named_failure
from cxrd.core.supervisor import Supervisor
from cxrd.errors import AlreadyServing, CxrdError, InvalidConfig, StartFailed
from cxrd.host import SystemHost, SystemReadiness
from cxrd.instances import Instance
from cxrd.system import eula
from cxrd.system.listeners import bind_listener
from cxrd.system.notify import SdNotifier
from cxrd.system.process import ProcessLauncher
from cxrd.system.reaper import OrphanReaper, is_init
from cxrd.system.rundir import InstallLock, leftovers

if TYPE_CHECKING:
    from cxrd.dbus.service import DBusService
    from cxrd.health.server import HealthServer

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


def build_parser() -> argparse.ArgumentParser:
    """The daemon's flags; also the source of its completions and cxrd(8)."""
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
    p.add_argument(
        "--bus",
        choices=BUS_MODES,
        help="the session bus: auto (if reachable), session (required), none (bus; default auto)",
    )
    p.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        help="serve /livez, /readyz, /metrics there (health.listen; default off)",
    )
    p.add_argument(
        "--accept-eula",
        action="store_true",
        help=f"accept the NVIDIA CloudXR EULA ({eula.EULA_URL}); also {ACCEPT_EULA_ENV}=1",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.add_argument("--version", action="version", version=f"cxrd {__version__}")
    return p


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
        "bus": args.bus,
        "health.listen": args.health_listen,
    }


ACCEPT_EULA_ENV = "CXRD_ACCEPT_EULA"
_YES = frozenset({"1", "true", "yes", "on"})
_NO = frozenset({"", "0", "false", "no", "off"})


def eula_accepted_by(args: argparse.Namespace) -> str | None:
    """What accepts the EULA for this start (the flag or the variable), or None."""
    if args.accept_eula:
        return "--accept-eula"
    raw = os.environ.get(ACCEPT_EULA_ENV, "")
    if raw.strip().lower() in _YES:
        return f"{ACCEPT_EULA_ENV}={raw}"
    if raw.strip().lower() in _NO:
        return None
    raise InvalidConfig(f"{ACCEPT_EULA_ENV}={raw!r}: expected 1 to accept the EULA, or 0")


def read_config(args: argparse.Namespace) -> Config:
    return load_config(
        args.config,
        instance=args.instance,
        env_file=args.env_file,
        overrides=overrides_from(args),
        environ=os.environ,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The daemon; its signals are held (``cxrd.__main__``) until the loop handles them."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        return _main(argv)
    finally:
        # One that came while no loop handled it (a bad config): cxrd ends anyway.
        while signal.sigtimedwait(HELD_SIGNALS, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose + 1)
    try:
        config = read_config(args)
        eula_accepted_by(args)
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
    loop = asyncio.get_running_loop()
    reaper: OrphanReaper | None = None
    if is_init():
        # The first process of a PID namespace: every orphan's zombie is ours.
        reaper = OrphanReaper()
        reaper.start()
        log.info("running as PID 1: reaping orphaned processes")
    launcher = ProcessLauncher(reaper)
    launcher.leave_clean(*leftovers(config.run_dir))  # should cxrd be killed
    host = SystemHost()
    supervisor = Supervisor(
        config,
        launcher=launcher,
        notifier=notifier,
        readiness=SystemReadiness(),
        host=host,
    )
    host.on_env_event = supervisor.refresh  # Status() shows cloudxr.env's last restore
    background: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    # Before anything starts: a signal held since main() is handled from here.
    loop.add_signal_handler(signal.SIGTERM, supervisor.request_stop, "SIGTERM received")
    loop.add_signal_handler(signal.SIGINT, supervisor.request_stop, "SIGINT received")
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(_reload(supervisor, config, args)))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)

    health_sock: socket.socket | None = None
    try:
        _accept_eula(config, args)
        health_sock = _bind_health(config)
    except CxrdError as err:
        supervisor.fail(err)  # before anything starts
    controller = asyncio.create_task(supervisor.run(), name="cxrd-supervisor")
    # The runtime first: the slow rest (D-Bus, the proxy's certificate) happens
    # while it comes up.
    spawn(_launch(supervisor))
    if os.environ.get("CXRD_TEST_HOOKS") == "1":
        # Test hook for the watchdog: a wedged event loop.
        loop.add_signal_handler(signal.SIGUSR2, time.sleep, 3600)
    interval = notifier.watchdog_interval()
    if interval is not None:
        spawn(_watchdog(notifier, interval))
    service: DBusService | None = None
    health: HealthServer | None = None
    try:
        try:
            if health_sock is not None:
                health = await _serve_health(health_sock, supervisor, reaper)
                health_sock = None
            service = await _serve_bus(supervisor, config.bus, Instance(config.instance).bus_name)
        except (AlreadyServing, StartFailed) as err:
            supervisor.fail(err)
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
        if health is not None:
            health.close()
            await health.wait_closed()
        if health_sock is not None:
            health_sock.close()
        launcher.close()
        if reaper is not None:
            await reaper.end()
        lock.release()


def _accept_eula(config: Config, args: argparse.Namespace) -> None:
    by = eula_accepted_by(args)
    if by is None:
        return
    try:
        marker = eula.accept(config.install_path)
    except OSError as exc:
        # A full disk or a read-only install dir: a named failure, not a traceback.
        raise named_failure(f"cannot record the EULA acceptance ({by})", exc) from exc
    log.info("NVIDIA CloudXR EULA (%s) accepted by %s: wrote %s", eula.EULA_URL, by, marker)


async def _stop_when_bus_lost(supervisor: Supervisor, service: DBusService) -> None:
    # Nobody can reach or stop us any more; the session is most likely ending.
    await service.wait_disconnected()
    supervisor.request_stop("the session bus connection was lost")


async def _launch(supervisor: Supervisor) -> None:
    # A failed start ends in run() with the error's exit code.
    with contextlib.suppress(CxrdError):
        await supervisor.launch()


async def _reload(supervisor: Supervisor, config: Config, args: argparse.Namespace) -> None:
    log.info("SIGHUP: re-reading the configuration")

    def read() -> Config:
        new = read_config(args)
        for key, old_value, new_value in (
            ("bus", config.bus, new.bus),
            ("health.listen", config.health.listen, new.health.listen),
        ):
            if old_value != new_value:
                log.warning("%s: %s changed; it takes effect at the next start", new.source, key)
        return new

    # Applied or refused, the supervisor logs it and tells systemd (READY=1).
    with contextlib.suppress(CxrdError):
        await supervisor.reload(read)


async def _watchdog(notifier: SdNotifier, interval: float) -> None:
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def _bind_health(config: Config) -> socket.socket | None:
    """health.listen's socket, bound before anything starts: a taken port stops nothing."""
    address = config.health.address
    if address is None:
        return None
    try:
        return bind_listener(*address)
    except StartFailed as err:
        raise StartFailed(f"health.listen {config.health.listen}: {err}") from None


async def _serve_health(
    sock: socket.socket, supervisor: Supervisor, reaper: OrphanReaper | None
) -> HealthServer:
    # Imported here, like D-Bus: prometheus_client loads while the runtime comes up.
    from cxrd.health.server import HealthServer

    server = HealthServer(supervisor, reaped=(lambda: reaper.reaped) if reaper else None)
    await server.serve(sock)
    return server


async def _serve_bus(supervisor: Supervisor, mode: str, bus_name: str) -> DBusService | None:
    """The D-Bus surface, as ``bus`` says: auto, session (required) or none."""
    if mode == "none":
        log.info("bus = none: not connecting to D-Bus (cxrctl status reads the health endpoint)")
        return None
    # Imported here: dbus-fast loads while the runtime is already coming up.
    from cxrd.dbus.connection import session_bus_address
    from cxrd.dbus.service import serve_dbus

    address = session_bus_address()
    if address is None:
        where = "DBUS_SESSION_BUS_ADDRESS is unset and there is no $XDG_RUNTIME_DIR/bus"
        if mode == "session":
            raise StartFailed(
                f"bus = session: there is no session bus ({where}); "
                "run with --bus auto or --bus none to go on without D-Bus"
            )
        log.warning(
            "no session bus (%s): running without D-Bus (bus = auto); "
            "everything but the D-Bus surface works",
            where,
        )
        return None
    try:
        return await serve_dbus(supervisor, bus_address=address, bus_name=bus_name)
    except StartFailed as err:
        if mode == "session":
            raise StartFailed(f"bus = session: {err}") from None
        log.error("%s; running without D-Bus (bus = auto)", err)
        return None


if __name__ == "__main__":
    sys.exit(main())
