"""Leases that hold (issue 15, item 3): a real cxrd on a real private bus, with activation.

``lease()`` on a daemon its own call activates gets the profile, env and GPU
it asks for; a lease taken while the old daemon is stopping is held by the
daemon that serves the block, and leaving the block raises nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fixtures_dbus import BusDaemon
from support import TIMEOUT, wait_until

from cxrd.client import CloudXRClient
from cxrd.core.states import State
from cxrd.errors import InvalidArgs, NotRunning


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


def test_a_lease_on_a_daemon_its_call_activates_gets_what_it_asks_for(
    bus_daemon: BusDaemon,
) -> None:
    bus_daemon.enable_activation()
    with CloudXRClient(bus_daemon.address) as client:
        with client.lease(
            "teleop",
            timeout=TIMEOUT,
            device_profile="auto-webrtc",
            env={"NV_CXR_ENABLE_PUSH_DEVICES": "0"},
            gpu=1,
            apply_environment=False,
        ) as lease:
            snap = client.status()
            runtime = _environ(snap.runtime.pid)
            assert runtime["NV_DEVICE_PROFILE"] == "auto-webrtc"
            assert runtime["NV_CXR_ENABLE_PUSH_DEVICES"] == "0"
            assert runtime["NV_CXR_GPU_INDEX_CUDA"] == "1"
            assert lease.environment["NV_CXR_GPU_INDEX_CUDA"] == "1", "cloudxr.env says it too"
            assert snap.gpu == 1 and snap.requested["device_profile"] == "auto-webrtc"
            assert snap.requested_by.startswith(client.unique_name)
            assert [x.id for x in snap.leases] == [lease.id]
        assert client.status().leases == ()


def test_a_lease_taken_while_the_daemon_idles_out_is_held_by_the_next_daemon(
    bus_daemon: BusDaemon,
) -> None:
    # The runtime ignores SIGTERM: the idle stop takes stop_timeout (2 s), a window
    # in which a new lease meets a daemon on its way out.
    bus_daemon.configure(top="stop_when_idle = true\nidle_grace = 0.3", ignore_sigterm=True)
    bus_daemon.enable_activation()
    with CloudXRClient(bus_daemon.address) as client:
        with client.lease("a first session", timeout=TIMEOUT, apply_environment=False):
            pass  # its end arms the idle stop
        (old,) = bus_daemon.daemon_pids()
        wait_until(lambda: _state_or_none(client) is State.STOPPING, what="the idle stop")
        with client.lease("teleop", timeout=TIMEOUT, apply_environment=False) as lease:
            snap = client.status()
            assert [x.id for x in snap.leases] == [lease.id], "the serving daemon holds it"
            assert bus_daemon.daemon_pids() != [old]
            time.sleep(0.6)  # twice the idle grace: the lease keeps the new daemon up
            assert client.status().state is State.READY
        # Leaving the block raised nothing; the lease ended, so the new daemon idles out.
        wait_until(lambda: _state_or_none(client) in (None, State.STOPPING), what="idle stop")


def _state_or_none(client: CloudXRClient) -> State | None:
    try:
        return client.status().state
    except NotRunning:
        return None


def test_a_start_asking_for_reserved_keys_is_refused_over_the_bus_naming_them(
    ready_daemon: BusDaemon,
) -> None:
    with CloudXRClient(ready_daemon.address) as client:
        pid = client.status().runtime.pid
        with pytest.raises(InvalidArgs) as caught:
            client.start(env={"XR_RUNTIME_JSON": "/x", "NV_CXR_SERVER_PORT": "1"}, gpu=-1)
        for named in ("XR_RUNTIME_JSON", "NV_CXR_SERVER_PORT", "gpu -1"):
            assert named in str(caught.value)
        assert client.status().runtime.pid == pid
