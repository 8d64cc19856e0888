"""``python -m cxrd.sim`` as a real process: what a supervisor and a client see of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from support import TIMEOUT, free_port, wait_until
from websockets.asyncio.client import connect

from cxrd import constants as C
from cxrd.sim import faults as F
from cxrd.system.readiness import wait_for_file


class Sim:
    """One sim process in its own session, with the paths it serves."""

    def __init__(self, tmp: Path) -> None:
        self.install = tmp / "cloudxr"
        self.run_dir = self.install / C.RUN_DIR
        self.logs = self.install / C.LOGS_DIR
        self.stderr_path = tmp / "sim_stderr.log"
        self.cwd = tmp
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(F.PREFIX)}
        self.env.update(
            {
                "XR_RUNTIME_JSON": str(self.install / "openxr_cloudxr.json"),
                "NV_CXR_RUNTIME_DIR": str(self.run_dir),
                "NV_CXR_OUTPUT_DIR": str(self.logs),
                "CXR_INSTALL_DIR": str(self.install),
                "NV_DEVICE_PROFILE": "AppleVisionPro",
                F.SIGNALING_PORT: str(self.port),
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def sentinel(self) -> Path:
        return self.run_dir / C.SENTINEL_FILE

    @property
    def ipc(self) -> Path:
        return self.run_dir / C.IPC_SOCKET

    def start(self, **faults: str) -> subprocess.Popen[bytes]:
        self.env.update(faults)
        self.started_at = time.monotonic()
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cxrd.sim"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self.proc

    def wait_ready(self) -> None:
        """Wait for the sentinel with inotify (the run dir may not exist yet)."""
        wait_until(self.run_dir.is_dir, what="the run dir")
        asyncio.run(asyncio.wait_for(wait_for_file(self.sentinel), TIMEOUT))

    def wait_exit(self) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=TIMEOUT)

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def server_log(self) -> str:
        """The newest cxr_server.*.log; "" while there is none."""
        logs = sorted(self.logs.glob(C.SERVER_LOG_GLOB))
        return logs[-1].read_text(encoding="utf-8") if logs else ""

    def kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=TIMEOUT)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    s = Sim(tmp_path)
    yield s
    s.kill()


def wait_pid_gone(pid: int) -> None:
    """Wait for a process that is not our child to end (pidfd: no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], TIMEOUT)
        assert ready, f"pid {pid} still alive after {TIMEOUT} s"
    finally:
        os.close(fd)


def ipc_connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        return True


def test_sim_becomes_ready_serves_ipc_and_says_it_is_a_simulator(sim: Sim) -> None:
    sim.start()
    sim.wait_ready()
    assert ipc_connects(sim.ipc)
    assert "SIMULATED CloudXR runtime" in sim.stderr()
    assert "not NVIDIA CloudXR" in sim.stderr()
    log = sim.server_log()
    assert "SIMULATED CloudXR runtime" in log
    assert "'AppleVisionPro'" in log
    assert oct(sim.run_dir.stat().st_mode & 0o777) == oct(0o700)


def test_sim_websocket_echoes_and_shows_path_subprotocol_and_profile(sim: Sim) -> None:
    sim.start()
    sim.wait_ready()

    async def talk() -> tuple[dict[str, Any], str | None, str, Any, Any, int | None, str | None]:
        url = f"ws://127.0.0.1:{sim.port}/sign/in?peer=7"
        async with asyncio.timeout(TIMEOUT):
            async with connect(
                url, subprotocols=["cloudxr.v2", "other"], additional_headers={"X-Trace": "abc"}
            ) as ws:
                hello = json.loads(await ws.recv())
                server = ws.response.headers["Server"] if ws.response else ""
                await ws.send("text ∞")
                text = await ws.recv()
                await ws.send(b"\x00\xffbinary")
                binary = await ws.recv()
                await ws.send("close:4001:going on a break")
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                rcvd = ws.close_code, ws.close_reason
        return hello, ws.subprotocol, server, text, binary, *rcvd

    hello, subprotocol, server, text, binary, code, reason = asyncio.run(talk())
    assert hello["simulated"] is True
    assert hello["path"] == "/sign/in?peer=7"
    assert hello["subprotocol"] == "cloudxr.v2"
    assert hello["device_profile"] == "AppleVisionPro"
    assert ["X-Trace", "abc"] in hello["headers"]
    assert subprotocol == "cloudxr.v2"
    assert server == "cxrd-sim"
    assert text == "text ∞"
    assert binary == b"\x00\xffbinary"
    assert (code, reason) == (4001, "going on a break")


def test_sim_sigterm_removes_sentinel_and_socket_and_exits_0(sim: Sim) -> None:
    proc = sim.start()
    sim.wait_ready()
    os.kill(proc.pid, signal.SIGTERM)
    assert sim.wait_exit() == 0
    assert not sim.sentinel.exists()
    assert not sim.ipc.exists()
    assert "stopped cleanly" in sim.server_log()


def test_sim_sigterm_during_startup_delay_exits_0_without_becoming_ready(sim: Sim) -> None:
    proc = sim.start(**{F.STARTUP_DELAY: "30"})
    wait_until(sim.ipc.exists, "the ipc socket")
    os.kill(proc.pid, signal.SIGTERM)
    assert sim.wait_exit() == 0
    assert not sim.sentinel.exists()
    assert not sim.ipc.exists()


def test_sim_needs_absolute_runtime_paths_like_the_real_run(sim: Sim) -> None:
    sim.env["XR_RUNTIME_JSON"] = "relative/openxr_cloudxr.json"
    sim.start()
    assert sim.wait_exit() == 1
    assert "XR_RUNTIME_JSON='relative/openxr_cloudxr.json' is not an absolute path" in sim.stderr()

    del sim.env["NV_CXR_RUNTIME_DIR"]
    sim.env["XR_RUNTIME_JSON"] = str(sim.install / "openxr_cloudxr.json")
    sim.start()
    assert sim.wait_exit() == 1
    assert "NV_CXR_RUNTIME_DIR is not set" in sim.stderr()
    assert not sim.sentinel.exists()


def test_sim_rejects_a_run_dir_that_disagrees_with_the_install_dir(sim: Sim) -> None:
    sim.env["NV_CXR_RUNTIME_DIR"] = str(sim.install / "elsewhere")
    sim.start()
    assert sim.wait_exit() == 1
    assert "NV_CXR_RUNTIME_DIR mismatch" in sim.stderr()


def test_sim_startup_delay_holds_back_the_sentinel(sim: Sim) -> None:
    sim.start(**{F.STARTUP_DELAY: "2.0"})
    wait_until(sim.ipc.exists, "the ipc socket")
    assert not sim.sentinel.exists(), "ready before the startup delay"
    sim.wait_ready()
    assert time.monotonic() - sim.started_at >= 2.0


def test_sim_exit_before_ready_exits_with_that_code_and_says_why(sim: Sim) -> None:
    sim.start(**{F.EXIT_BEFORE_READY: "7"})
    assert sim.wait_exit() == 7
    assert not sim.sentinel.exists()
    assert "CXRD_SIM_EXIT_BEFORE_READY" in sim.stderr()
    assert "exiting with code 7 before ready" in sim.server_log()


def test_sim_never_ready_stays_alive_without_a_sentinel(sim: Sim) -> None:
    proc = sim.start(**{F.NEVER_READY: "1"})
    wait_until(lambda: "never becoming ready" in sim.stderr(), "the never-ready notice")
    assert not sim.sentinel.exists()
    assert proc.poll() is None
    assert ipc_connects(sim.ipc), "a never-ready runtime is still live on its socket"


def test_sim_crash_after_dies_of_sigsegv_leaving_no_core_file(sim: Sim) -> None:
    sim.start(**{F.CRASH_AFTER: "0.3"})
    sim.wait_ready()
    assert sim.wait_exit() == -signal.SIGSEGV
    assert "simulated crash" in sim.stderr()
    assert not list(sim.cwd.glob("core*"))
    # A crashed runtime cleans nothing up: its files are stale now.
    assert sim.ipc.exists() and not ipc_connects(sim.ipc)


def test_sim_ignore_sigterm_keeps_running_until_sigkill(sim: Sim) -> None:
    proc = sim.start(**{F.IGNORE_SIGTERM: "1"})
    sim.wait_ready()
    os.kill(proc.pid, signal.SIGTERM)
    wait_until(lambda: "SIGTERM received and ignored" in sim.stderr(), "the ignore notice")
    assert proc.poll() is None
    assert ipc_connects(sim.ipc)
    os.killpg(proc.pid, signal.SIGKILL)
    assert sim.wait_exit() == -signal.SIGKILL


def test_sim_grandchild_lives_in_the_group_and_dies_with_it(sim: Sim) -> None:
    proc = sim.start(**{F.SPAWN_GRANDCHILD: "1"})
    sim.wait_ready()
    grandchild = int((sim.run_dir / F.GRANDCHILD_PID_FILE).read_text())
    assert grandchild != proc.pid
    assert os.getpgid(grandchild) == proc.pid
    os.killpg(proc.pid, signal.SIGTERM)
    assert sim.wait_exit() == 0
    wait_pid_gone(grandchild)


def test_sim_floods_stderr_before_ready(sim: Sim) -> None:
    size = 3 * 1024 * 1024 + 17
    sim.start(**{F.FLOOD_STDERR: str(size)})
    sim.wait_ready()
    text = sim.stderr()
    lines = [line for line in text.split("\n") if "flood line" in line]
    flood = sum(len(line) + 1 for line in lines)
    # Whole numbered lines, at least the bytes asked for.
    assert size <= flood <= size + 200
    assert [int(line.split()[3]) for line in lines] == list(range(len(lines)))
    assert f"wrote {flood} bytes to stderr" in sim.server_log()


def test_sim_rejects_unknown_and_bad_fault_variables(sim: Sim) -> None:
    sim.start(CXRD_SIM_CRASH_AFTR="1")
    assert sim.wait_exit() == 2
    assert "CXRD_SIM_CRASH_AFTR: unknown simulator variable" in sim.stderr()
    del sim.env["CXRD_SIM_CRASH_AFTR"]
    sim.start(**{F.STARTUP_DELAY: "soon"})
    assert sim.wait_exit() == 2
    assert "CXRD_SIM_STARTUP_DELAY='soon'" in sim.stderr()


def test_sim_signaling_port_taken_is_a_clear_exit_1(sim: Sim) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", sim.port))
        taken.listen()
        sim.start()
        assert sim.wait_exit() == 1
    assert f"cannot listen for signaling on 127.0.0.1:{sim.port}" in sim.stderr()
    assert not sim.sentinel.exists()


def test_sim_replaces_stale_run_files_like_the_real_runtime(sim: Sim) -> None:
    sim.run_dir.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sim.ipc))
    stale.close()  # a socket file nobody serves
    sim.sentinel.touch()
    (sim.run_dir / "monado.pid").write_text("1\n")
    proc = sim.start(**{F.STARTUP_DELAY: "30"})
    wait_until(lambda: "listening on" in sim.server_log(), "the ipc socket bound")
    assert not sim.sentinel.exists(), "the stale sentinel must go before the sim is ready"
    assert not (sim.run_dir / "monado.pid").exists()
    assert ipc_connects(sim.ipc)
    os.kill(proc.pid, signal.SIGTERM)
    assert sim.wait_exit() == 0
