"""A client and a launcher made before ``fork()``: the child uses them, the parent keeps its own.

Real private dbus-daemon, real cxrd. The child connects afresh (the parent's
connection and helper thread are not its), never cuts the parent's
connection, and leaves the parent's lease alone.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

from fixtures_dbus import BusDaemon
from support import TIMEOUT, wait_until

from cxrd.client import CloudXRClient
from cxrd.launcher import CloudXRLauncher


def in_child(work: Any) -> dict[str, Any]:
    """Fork; run ``work()`` in the child; its JSON answer, or an error after TIMEOUT."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 2 * TIMEOUT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"the child did not answer within {2 * TIMEOUT:g} s")
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    result: dict[str, Any] = json.loads(data)
    return result


def test_a_client_and_a_launcher_made_before_fork_work_in_the_child(
    ready_daemon: BusDaemon,
) -> None:
    address = ready_daemon.address
    client = CloudXRClient(address)
    launcher = CloudXRLauncher(install_dir=str(ready_daemon.denv.install_dir), bus_address=address)
    try:
        parents_lease = launcher._lease.id if launcher._lease else ""
        assert parents_lease in {lease.id for lease in client.status().leases}

        def child() -> dict[str, Any]:
            began = time.monotonic()
            state = str(client.status().state)
            launcher.health_check()
            seen = {lease.id for lease in client.status().leases}
            launcher.stop()  # the parent's lease and cxrd stay as they are
            client.close()
            return {"state": state, "seen": sorted(seen), "took": time.monotonic() - began}

        result = in_child(child)
        assert result["state"] == "ready"
        assert parents_lease in result["seen"]
        assert result["took"] < TIMEOUT, "the child's calls answered at once, not after 600 s"
        # The parent's connection, lease and cxrd came through the child's stop() and close().
        snap = client.status()
        assert str(snap.state) == "ready"
        assert parents_lease in {lease.id for lease in snap.leases}
        launcher.health_check()
    finally:
        launcher.stop()
        client.close()
    with CloudXRClient(address) as fresh:
        assert parents_lease not in {lease.id for lease in fresh.status().leases}


def test_close_in_the_child_never_blocks(ready_daemon: BusDaemon) -> None:
    client = CloudXRClient(ready_daemon.address)
    try:

        def child() -> dict[str, Any]:
            began = time.monotonic()
            client.close()
            return {"took": time.monotonic() - began}

        assert in_child(child)["took"] < 1.0
        assert str(client.status().state) == "ready"
    finally:
        client.close()


HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from cxrd.client import CloudXRClient
    client = CloudXRClient(sys.argv[1])
    lease = client.acquire("forks, then dies")
    child = os.fork()
    if child == 0:
        os.close(1), os.close(2)  # the test reads the parent's output to its end
        time.sleep(60)
        os._exit(0)
    print(lease, child, flush=True)
    os._exit(0)  # no close: the lease ends with the connection
    """
)


def test_a_forked_child_does_not_keep_the_parents_lease_alive(ready_daemon: BusDaemon) -> None:
    out = subprocess.run(
        [sys.executable, "-c", HOLDER, ready_daemon.address],
        capture_output=True, text=True, timeout=TIMEOUT, env=ready_daemon.env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lease, child = out.stdout.split()
    try:
        with CloudXRClient(ready_daemon.address) as client:
            wait_until(
                lambda: lease not in {held.id for held in client.status().leases},
                what="the dead parent's lease to end while its child lives",
            )
        assert os.path.exists(f"/proc/{child}"), "the child lived on meanwhile"
    finally:
        os.kill(int(child), signal.SIGKILL)
