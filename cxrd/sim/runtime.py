"""``python -m cxrd.sim``: a stand-in for the CloudXR runtime's observable contract.

It is NOT NVIDIA CloudXR: it renders nothing and streams nothing. It does what
a supervisor and a client can see of the real runtime (CLOUDXR_FACTS), so cxrd
can be tested and demonstrated on machines without a GPU:

1. requires absolute ``XR_RUNTIME_JSON`` and ``NV_CXR_RUNTIME_DIR`` (and, when
   ``CXR_INSTALL_DIR`` is set, the values ``isaacteleop``'s ``run()`` derives
   from it), else exits 1 with the reason on stderr;
2. removes stale run-dir files as ``run()`` does, writes
   ``<NV_CXR_OUTPUT_DIR>/cxr_server.<UTC timestamp>.log``;
3. binds the Unix stream socket ``<run_dir>/ipc_cloudxr`` and the WebSocket
   signaling endpoint (``cxrd.sim.signaling``);
4. after the startup delay creates ``<run_dir>/runtime_started``;
5. on SIGTERM or SIGINT removes ``runtime_started`` and ``ipc_cloudxr``,
   closes its sockets and exits 0.

Faults come from ``CXRD_SIM_*`` variables (``cxrd.sim.faults``). A fault that
kills the sim (exit before ready, crash) leaves its run-dir files behind, as a
dying runtime does. Exit codes: 0 clean stop, 1 bad environment or a socket
that cannot be bound, 2 a bad ``CXRD_SIM_*`` value, N for
``CXRD_SIM_EXIT_BEFORE_READY=N``, killed by SIGSEGV for ``CXRD_SIM_CRASH_AFTER``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import IO, TYPE_CHECKING, NoReturn

from cxrd import constants as C
from cxrd.sim import faults as F

if TYPE_CHECKING:
    from websockets.asyncio.server import Server

BANNER = "SIMULATED CloudXR runtime for tests and demos - not NVIDIA CloudXR"
# What the sim tells each signaling client it was given (which runtime it reached).
REPORTED_ENV = (C.SERVER_PORT_ENV, C.MEDIA_PORT_ENV, C.GPU_CUDA_ENV, "CXR_INSTALL_DIR")
_PREFIX = "cxrd-sim"
_FLOOD_LINE = b"cxrd-sim: flood line %09d as CXRD_SIM_FLOOD_STDERR asked, padding padding\n"
_FLOOD_BLOCK = 65536
_FLOOD_PAUSE = 0.01
_PR_SET_DUMPABLE = 4


class _SetupError(Exception):
    """The environment cannot describe a runtime; exit 1 like ``run()`` raising."""


@dataclass(frozen=True)
class _Paths:
    run_dir: str
    output_dir: str
    device_profile: str

    @property
    def ipc(self) -> str:
        return os.path.join(self.run_dir, C.IPC_SOCKET)

    @property
    def sentinel(self) -> str:
        return os.path.join(self.run_dir, C.SENTINEL_FILE)


def _paths(env: Mapping[str, str]) -> _Paths:
    values = {}
    for var in ("XR_RUNTIME_JSON", "NV_CXR_RUNTIME_DIR"):
        value = env.get(var, "")
        if not value:
            raise _SetupError(f"{var} is not set; the runtime needs it (cxrd sets it)")
        if not os.path.isabs(value):
            raise _SetupError(f"{var}={value!r} is not an absolute path")
        values[var] = os.path.normpath(value)
    install = env.get("CXR_INSTALL_DIR", "")
    if install:
        install = os.path.abspath(os.path.expanduser(install))
        expected = {
            "XR_RUNTIME_JSON": os.path.join(install, "openxr_cloudxr.json"),
            "NV_CXR_RUNTIME_DIR": os.path.join(install, C.RUN_DIR),
        }
        for var, want in expected.items():
            if values[var] != want:
                raise _SetupError(
                    f"{var} mismatch: environment has {values[var]!r}, "
                    f"expected {want!r} from CXR_INSTALL_DIR"
                )
    run_dir = values["NV_CXR_RUNTIME_DIR"]
    output = env.get("NV_CXR_OUTPUT_DIR", "") or os.path.join(os.path.dirname(run_dir), C.LOGS_DIR)
    profile = env.get(C.DEVICE_PROFILE_ENV, "") or C.DEFAULT_DEVICE_PROFILE
    return _Paths(run_dir=run_dir, output_dir=os.path.abspath(output), device_profile=profile)


class _Log:
    """The server log (``cxr_server.<ts>.log``); some lines also go to stderr."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream

    def note(self, message: str, *, stderr: bool = False) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        if self.stream is not None:
            self.stream.write(f"{stamp}Z {_PREFIX}[{os.getpid()}]: {message}\n")
        if stderr:
            _stderr(message)


def _stderr(message: str) -> None:
    sys.stderr.write(f"{_PREFIX}: {message}\n")
    sys.stderr.flush()


def main() -> int:
    pending: list[int] = []

    def early(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    signal.signal(signal.SIGTERM, early)
    signal.signal(signal.SIGINT, early)
    _stderr(f"{BANNER} (pid {os.getpid()})")
    try:
        faults = F.parse_faults(os.environ)
    except ValueError as exc:
        _stderr(f"error: {exc}")
        return 2
    try:
        paths = _paths(os.environ)
        os.makedirs(paths.run_dir, mode=0o700, exist_ok=True)
        os.makedirs(paths.output_dir, exist_ok=True)
    except (_SetupError, OSError) as exc:
        _stderr(f"error: {exc}")
        return 1
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S.%fZ")
    log_path = os.path.join(paths.output_dir, C.SERVER_LOG_GLOB.replace("*", stamp))
    with open(log_path, "a", buffering=1, encoding="utf-8") as stream:
        log = _Log(stream)
        log.note(BANNER)
        log.note(f"pid {os.getpid()}, device profile {paths.device_profile!r}")
        log.note(f"faults: {faults.describe()}")
        shown = sorted(k for k in os.environ if k.startswith(("NV_", "XR", "CXR_")))
        log.note("environment: " + " ".join(f"{k}={os.environ[k]}" for k in shown))
        for name in (*C.STALE_RUN_FILES, F.GRANDCHILD_PID_FILE, F.ORPHAN_PID_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(paths.run_dir, name))
                log.note(f"removed stale {name}")
        if faults.flood_stderr:
            written = _flood_stderr(faults.flood_stderr)
            log.note(f"wrote {written} bytes to stderr (CXRD_SIM_FLOOD_STDERR)")
        if faults.spawn_grandchild:
            pid = _spawn_grandchild(paths.run_dir)
            log.note(f"spawned grandchild pid {pid} in my process group")
        if faults.orphan_grandchild:
            pid = _leave_orphan(paths.run_dir)
            log.note(f"left orphan pid {pid} in my process group; it ends in {F.ORPHAN_LIFETIME} s")
        return asyncio.run(_Sim(faults, paths, log, pending).run())


def _flood_stderr(count: int) -> int:
    """Numbered lines, at least ``count`` bytes, 64 KiB per 10 ms: a chatty runtime's pace.

    The numbers let a reader check that none was lost or reordered. Returns
    the bytes written (whole lines).
    """
    sys.stderr.flush()
    number = 0
    left = count
    while left > 0:
        lines = []
        size = 0
        while size < _FLOOD_BLOCK and size < left:
            line = _FLOOD_LINE % number
            number += 1
            lines.append(line)
            size += len(line)
        block = memoryview(b"".join(lines))
        left -= len(block)
        while block:
            block = block[os.write(2, block) :]
        time.sleep(_FLOOD_PAUSE)
    return count - left


def _spawn_grandchild(run_dir: str) -> int:
    """Fork a process that lives in our group until a signal kills it."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the grandchild: no Python handlers, no cleanup, just wait
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            while True:
                signal.pause()
        finally:
            os._exit(0)
    target = os.path.join(run_dir, F.GRANDCHILD_PID_FILE)
    with open(target + ".tmp", "w", encoding="ascii") as out:
        out.write(f"{pid}\n")
    os.replace(target + ".tmp", target)
    return pid


def _leave_orphan(run_dir: str) -> int:
    """Double-fork: the middle process exits at once, so its child is re-parented.

    The orphan lives ORPHAN_LIFETIME more, then exits: its zombie is for PID 1
    (or the nearest subreaper) to reap.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read_end)
            orphan = os.fork()
            if orphan == 0:
                os.close(write_end)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                time.sleep(F.ORPHAN_LIFETIME)
            else:
                os.write(write_end, f"{orphan}\n".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        pid = int(pipe.read())
    os.waitpid(middle, 0)
    target = os.path.join(run_dir, F.ORPHAN_PID_FILE)
    with open(target + ".tmp", "w", encoding="ascii") as out:
        out.write(f"{pid}\n")
    os.replace(target + ".tmp", target)
    return pid


def _crash() -> NoReturn:
    """Die of SIGSEGV as a crashing runtime would, leaving no core file."""
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Not dumpable: no core even where core_pattern pipes to a helper.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGSEGV)
    os._exit(139)  # not reached: the signal is delivered before kill() returns


class _Sim:
    def __init__(self, faults: F.Faults, paths: _Paths, log: _Log, pending: list[int]) -> None:
        self.faults = faults
        self.paths = paths
        self.log = log
        self.pending = pending
        self.stop = asyncio.Event()
        self.ipc_clients: set[asyncio.StreamWriter] = set()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM and self.faults.ignore_sigterm:
            self.log.note(f"{name} received and ignored (CXRD_SIM_IGNORE_SIGTERM)", stderr=True)
            return
        self.log.note(f"{name} received: shutting down")
        self.stop.set()

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self.stop.wait()
        except TimeoutError:
            return False
        return True

    async def _ipc_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.ipc_clients.add(writer)
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            self.ipc_clients.discard(writer)
            writer.close()

    def _log_websockets_to_server_log(self) -> None:
        import logging

        note = self.log.note

        class ToServerLog(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                note(f"websockets: {record.getMessage()}")

        logger = logging.getLogger("cxrd.sim.signaling")
        logger.addHandler(ToServerLog())
        logger.setLevel(logging.INFO)
        logger.propagate = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, int(sig))
        for signum in self.pending:
            self._on_signal(signum)
        paths, faults, log = self.paths, self.faults, self.log
        try:
            ipc = await asyncio.start_unix_server(self._ipc_client, path=paths.ipc)
        except OSError as exc:
            log.note(f"error: cannot bind {paths.ipc}: {exc}", stderr=True)
            return 1
        ipc_inode = os.stat(paths.ipc).st_ino
        log.note(f"listening on {paths.ipc}")
        # Imported here, not at the top: websockets costs tens of ms of startup.
        from cxrd.sim.signaling import start_signaling

        self._log_websockets_to_server_log()

        where = f"{faults.signaling_host}:{faults.signaling_port}"
        try:
            signaling = await start_signaling(
                faults.signaling_host,
                faults.signaling_port,
                paths.device_profile,
                {k: os.environ[k] for k in REPORTED_ENV if k in os.environ},
                log.note,
            )
        except OSError as exc:
            log.note(f"error: cannot listen for signaling on {where}: {exc}", stderr=True)
            return 1
        log.note(f"signaling WebSocket listening on ws://{where}/")
        if not await self._stopped_within(faults.startup_delay):
            if faults.exit_before_ready is not None:
                code = faults.exit_before_ready
                log.note(
                    f"simulated startup failure (CXRD_SIM_EXIT_BEFORE_READY): "
                    f"exiting with code {code} before ready",
                    stderr=True,
                )
                return code
            if faults.never_ready:
                log.note("never becoming ready (CXRD_SIM_NEVER_READY)", stderr=True)
            else:
                fd = os.open(paths.sentinel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.close(fd)
                log.note(f"ready: created {paths.sentinel}")
                if faults.crash_after is not None and not await self._stopped_within(
                    faults.crash_after
                ):
                    log.note(
                        f"simulated crash (CXRD_SIM_CRASH_AFTER={faults.crash_after:g}): "
                        "killing myself with SIGSEGV",
                        stderr=True,
                    )
                    _crash()
            await self.stop.wait()
        return await self._shutdown(ipc, ipc_inode, signaling)

    async def _shutdown(self, ipc: asyncio.Server, ipc_inode: int, signaling: Server) -> int:
        paths, log = self.paths, self.log
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.sentinel)
        signaling.close()
        ipc.close()
        for writer in list(self.ipc_clients):
            writer.close()
        try:
            async with asyncio.timeout(2.0):
                await signaling.wait_closed()
                await ipc.wait_closed()
        except TimeoutError:
            log.note("connections did not close within 2 s; leaving anyway")
        with contextlib.suppress(FileNotFoundError):
            if os.stat(paths.ipc).st_ino == ipc_inode:
                os.unlink(paths.ipc)
        log.note("stopped cleanly")
        return 0
