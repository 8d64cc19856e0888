"""``cxrctl run -- COMMAND``: COMMAND as a child, on a leased runtime, with its environment.

In the spirit of ``systemd-run --scope`` and ``gamemoderun``: the lease lives
on this process's bus connection for COMMAND's whole life (so even a SIGKILLed
cxrctl lets go), COMMAND gets the runtime's environment plus
:data:`cxrd.constants.STAND_ASIDE`, and cxrctl exits with COMMAND's status
(128+N for signal N). Its own failures follow ``env(1)``: 127 COMMAND not
found, 126 not runnable (both checked before anything starts), 125 anything
of cxrd's (``main`` maps a CxrdError to it). Without a session bus it uses the
runtime serving the install dir, without a lease.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import shlex
import signal
import struct
import sys
import textwrap
from collections.abc import Awaitable, Mapping
from pathlib import Path
from signal import SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2
from typing import Any, TypeVar

from cxrd import constants as C
from cxrd.cli.common import Out, config_from_args, instance_from_args
from cxrd.cli.lifecycle import requested_choice
from cxrd.cli.status import fetch_health, readyz_url
from cxrd.client import AsyncCloudXRClient
from cxrd.config import Config
from cxrd.core.choice import Choice, mismatch_error
from cxrd.dbus.connection import session_bus_address
from cxrd.errors import CxrdError, InvalidConfig, NotRunning
from cxrd.errors import Timeout as TimedOut
from cxrd.system.envfile import read_env_file
from cxrd.system.readiness import wait_for_file
from cxrd.system.rundir import live_runtime_pid

EXIT_CXRD = 125  # env(1)'s "the wrapper itself failed"
EXIT_CANNOT_RUN, EXIT_NOT_FOUND = 126, 127  # env(1)'s too
FORWARDED = (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2)
REASON_MAX = 200  # characters of the lease's reason
_RECHECK = 0.1  # seconds, bus-less, while there is no run dir or only a stale sentinel to watch
_SI_KERNEL = 0x80  # si_code of a signal the kernel sent for the terminal (^C, ^\, hangup)
_SIGINFO = struct.Struct("=IiiI")  # signalfd_siginfo: ssi_signo, ssi_errno, ssi_code, ssi_pid
_SIGINFO_SIZE = 128
_T = TypeVar("_T")


class _Signalled(Exception):
    """A forwarded signal came before COMMAND existed: end with 128+N."""

    def __init__(self, signo: int) -> None:
        self.signo = signo


def cmd_run(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    err = Out(sys.stderr)
    if not argv:
        err.line("cxrctl run: no COMMAND given (cxrctl run [OPTIONS] -- COMMAND [ARGS...])")
        return 2
    exe = _resolve(argv[0])
    if isinstance(exe, int):
        word = "No such file or directory" if exe == EXIT_NOT_FOUND else "Permission denied"
        err.line(f"cxrctl run: {argv[0]!r}: {word}")
        return exe
    try:
        choice = requested_choice(args)
        choice.check()
        # Blocked from here on and read from a signalfd; COMMAND gets the old mask back.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            return asyncio.run(_run(args, argv, exe, choice, old_mask))
        finally:
            while signal.sigtimedwait(FORWARDED, 0) is not None:
                pass  # came after COMMAND ended: its status stands
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    except CxrdError as error:
        error.args = (f"{error.name}: {error}",)  # 125 says only "cxrd's": the name says which
        raise


def _resolve(name: str) -> str | int:
    """The file to execute, else 127 (none) or 126 (not runnable), as ``env(1)`` exits."""
    path = os.environ.get("PATH", os.defpath).split(os.pathsep)  # as shutil.which, then why
    candidates = [name] if "/" in name else [os.path.join(d or ".", name) for d in path]
    present = [c for c in candidates if os.path.lexists(c)]
    runnable = [c for c in present if os.access(c, os.X_OK) and not os.path.isdir(c)]
    return runnable[0] if runnable else EXIT_CANNOT_RUN if present else EXIT_NOT_FOUND


async def _run(
    args: argparse.Namespace, argv: list[str], exe: str, choice: Choice, old_mask: set[int]
) -> int:
    signals = _SignalFd(FORWARDED)
    try:
        try:
            config: Config | CxrdError = config_from_args(args)
        except CxrdError as err:  # needed only without a bus
            config = err
        client = await _client(args, config)
        if client is None:
            if isinstance(config, CxrdError):
                raise config
            env = await signals.unless(_busless_environment(config, args.timeout, choice))
            return await signals.run_child(exe, argv, env, old_mask)
        async with client:
            reason = textwrap.shorten(f"cxrctl run: {shlex.join(argv)}", REASON_MAX)
            held = await signals.unless(
                client.hold(
                    reason,
                    timeout=args.timeout,
                    device_profile=choice.profile,
                    env=choice.env,
                    gpu=choice.gpu,
                )
            )
            assert held.snapshot is not None
            try:
                return await signals.run_child(exe, argv, held.snapshot.environment, old_mask)
            finally:
                with contextlib.suppress(CxrdError):  # the lease ends with the connection anyway
                    await client.let_go(held)
    except _Signalled as sig:
        return 128 + sig.signo
    finally:
        signals.close()


async def _client(
    args: argparse.Namespace, config: Config | CxrdError
) -> AsyncCloudXRClient | None:
    """An open client, or None when there is no bus to use (after saying so, once)."""
    bus_none = isinstance(config, Config) and config.bus == "none"
    if not bus_none and session_bus_address() is not None:
        client = AsyncCloudXRClient(instance=instance_from_args(args).name)
        with contextlib.suppress(NotRunning):  # unreachable: as no bus
            await client.open()
            return client
    install = config.install_path if isinstance(config, Config) else "the configured install dir"
    Out(sys.stderr).line(
        f"cxrctl run: no session bus; using the runtime in {install} without a lease"
    )
    return None


async def _busless_environment(
    config: Config, timeout: float | None, choice: Choice
) -> dict[str, str]:
    """``run/cloudxr.env``, once a live runtime serves the run dir and its sentinel exists."""
    run_dir, sentinel = config.run_dir, config.run_dir / C.SENTINEL_FILE
    limit = timeout if timeout is not None else config.runtime.startup_timeout
    try:
        async with asyncio.timeout(limit):
            while True:
                if sentinel.exists() and live_runtime_pid(run_dir) is not None:
                    try:
                        env = read_env_file(run_dir / C.ENV_FILE)
                    except FileNotFoundError:
                        pass  # between one runtime and the next: look again
                    except ValueError as exc:
                        raise InvalidConfig(f"the runtime's environment: {exc}") from None
                    else:
                        _refuse_other(choice, env, run_dir)
                        return env
                with contextlib.suppress(FileNotFoundError):  # the run dir went meanwhile
                    if run_dir.is_dir() and not sentinel.exists():
                        await wait_for_file(sentinel)  # inotify
                        continue
                await asyncio.sleep(_RECHECK)  # no run dir yet, or a stale sentinel: no event
    except TimeoutError:
        why = await _health_says(config)
        raise TimedOut(f"no CloudXR runtime served {run_dir} within {limit:g} s {why}") from None


async def _health_says(config: Config) -> str:
    """What the daemon's health endpoint says, to explain a wait that ran out."""
    if not config.health.listen:
        return "(no health.listen to ask cxrd why)"
    url = readyz_url(config.health.listen)
    try:
        body = await asyncio.to_thread(fetch_health, url)
    except OSError as exc:
        return f"(cxrd's health endpoint {url} did not answer: {exc})"
    return f"(cxrd is {body.get('state')}: {body.get('reason') or 'no reason given'})"


def _refuse_other(choice: Choice, env: Mapping[str, str], run_dir: Path) -> None:
    """Without a lease nothing restarts: a request the runtime does not match is refused."""
    found = choice.differences_in(env)
    if found:
        raise mismatch_error(found, f"the runtime serving {run_dir} runs otherwise")


class _SignalFd:
    """The forwarded signals, read with who sent them from a signalfd on the event loop.

    Before COMMAND exists a signal ends cxrctl (128+N, the lease let go);
    then it goes to COMMAND, except one the kernel sent for the terminal while
    COMMAND shares our process group: the terminal sent it there too (sudo
    skips the same), so ^C arrives once. Hand-written over ctypes because
    asyncio's ``add_signal_handler`` hides ``si_code`` (the kernel's mark of a
    terminal's signal) and the stdlib's ``sigwaitinfo`` would need a thread
    blocked in it for COMMAND's whole life.
    """

    def __init__(self, signos: tuple[int, ...]) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mask = ctypes.create_string_buffer(128)  # glibc's sigset_t
        libc.sigemptyset(mask)
        for signo in signos:
            libc.sigaddset(mask, signo)
        self.fd: int = libc.signalfd(-1, mask, os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"signalfd: {os.strerror(errno)}")
        self._loop = asyncio.get_running_loop()
        self._got: asyncio.Future[int] = self._loop.create_future()
        self._child: asyncio.subprocess.Process | None = None
        self._loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, _SIGINFO_SIZE * 16)
        except BlockingIOError:
            return
        for at in range(0, len(data) - _SIGINFO_SIZE + 1, _SIGINFO_SIZE):
            signo, _, code, _ = _SIGINFO.unpack_from(data, at)
            child = self._child
            if child is None:
                if not self._got.done():
                    self._got.set_result(signo)
            elif child.returncode is None and not (code == _SI_KERNEL and _same_group(child.pid)):
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signo)

    async def unless(self, work: Awaitable[_T]) -> _T:
        """``work``'s result, unless a signal comes first: then cancel it, ``_Signalled``."""
        task = asyncio.ensure_future(work)
        either: set[asyncio.Future[Any]] = {task, self._got}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, CxrdError):
                await task
            raise _Signalled(self._got.result())
        return task.result()

    async def run_child(
        self, exe: str, argv: list[str], runtime_env: Mapping[str, str], old_mask: set[int]
    ) -> int:
        """COMMAND's exit status, 128+N when signal N killed it."""
        if self._got.done():
            raise _Signalled(self._got.result())
        env = {**os.environ, **runtime_env, **C.STAND_ASIDE}
        try:
            child = await asyncio.create_subprocess_exec(
                argv[0],
                *argv[1:],
                executable=exe,
                env=env,
                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, old_mask),
            )
        except OSError as exc:  # gone or changed since _resolve
            Out(sys.stderr).line(f"cxrctl run: {argv[0]!r}: {exc.strerror}")
            return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_RUN
        self._child = child
        if self._got.done():  # one came while it was being spawned
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(self._got.result())
        code = await child.wait()
        return 128 - code if code < 0 else code

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)


def _same_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == os.getpgrp()
    except ProcessLookupError:
        return False
