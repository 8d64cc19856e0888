"""Generic D-Bus tools nobody here wrote, against a live cxrd: busctl, gdbus, and another uid."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from dbus_helpers import Signals, connect, get_property, run
from fixtures_dbus import BusDaemon
from support import TIMEOUT

from cxrd.constants import BUS_NAME, INTERFACE, OBJECT_PATH
from cxrd.errors import AccessDenied, InvalidArgs

pytestmark = pytest.mark.skipif(
    shutil.which("busctl") is None or shutil.which("gdbus") is None,
    reason="busctl (systemd) and gdbus (libglib2.0-bin) are needed",
)


def tool(
    daemon: BusDaemon, *argv: str, as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DBUS_SESSION_BUS_ADDRESS": daemon.address,
        "HOME": "/nonexistent" if as_nobody else os.environ.get("HOME", "/root"),
        "SYSTEMD_COLORS": "0",
        "SYSTEMD_PAGER": "",
    }
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if as_nobody else []
    return subprocess.run(
        [*prefix, *argv], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def busctl(
    daemon: BusDaemon, verb: str, *args: str, as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    return tool(
        daemon,
        "busctl",
        "--user",
        "--no-pager",
        verb,
        BUS_NAME,
        OBJECT_PATH,
        *args,
        as_nobody=as_nobody,
    )


def gdbus(
    daemon: BusDaemon, method: str, *args: str, as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    return tool(
        daemon,
        "gdbus",
        "call",
        "--session",
        "--dest",
        BUS_NAME,
        "--object-path",
        OBJECT_PATH,
        "--method",
        f"{INTERFACE}.{method}",
        *args,
        as_nobody=as_nobody,
    )


def test_busctl_introspects_calls_and_reads_properties(ready_daemon: BusDaemon) -> None:
    shown = busctl(ready_daemon, "introspect")
    assert shown.returncode == 0, shown.stderr
    lines = [line.split() for line in shown.stdout.splitlines()]
    table = {row[0]: row[1:] for row in lines if row}
    assert table[".Start"][:2] == ["method", "a{sv}"]
    assert table[".Status"][:3] == ["method", "-", "a{sv}"]
    assert table[".Acquire"][:3] == ["method", "s", "s"]
    assert table[".Leases"][:2] == ["property", "a(ssusd)"]
    assert table[".State"][:3] == ["property", "s", '"ready"']
    assert table[".StateChanged"][:2] == ["signal", "sss"]
    assert "const" in table[".Version"]

    status = busctl(ready_daemon, "call", INTERFACE, "Status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("a{sv}") and '"state" s "ready"' in status.stdout

    state = busctl(ready_daemon, "get-property", INTERFACE, "State", "RuntimePid")
    assert state.returncode == 0, state.stderr
    first, second = state.stdout.splitlines()
    assert first == 's "ready"'
    assert second.startswith("u ") and int(second.split()[1]) > 0


def test_busctl_lease_ends_when_busctl_exits(ready_daemon: BusDaemon) -> None:
    async def scenario() -> None:
        bus = await connect(ready_daemon.address)
        signals = await Signals.watch(bus)
        acquired = busctl(ready_daemon, "call", INTERFACE, "Acquire", "s", "from busctl")
        assert acquired.returncode == 0, acquired.stderr
        assert acquired.stdout.startswith('s "')
        # busctl has exited, so its connection left the bus and the lease with it.
        leases = await signals.changed("Leases")
        while leases:
            leases = await signals.changed("Leases")
        assert await get_property(bus, "Leases") == []

    run(scenario())


def test_gdbus_starts_with_options_and_gets_named_errors(ready_daemon: BusDaemon) -> None:
    started = gdbus(ready_daemon, "Start", "{'timeout': <5.0>, 'device_profile': <'Quest3'>}")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "()"

    wrong = gdbus(ready_daemon, "Start", "{'timeout': <'soon'>}")
    assert wrong.returncode != 0
    assert InvalidArgs.dbus_name() in wrong.stderr and "timeout" in wrong.stderr
    assert "Traceback" not in wrong.stderr

    status = gdbus(ready_daemon, "Status")
    assert status.returncode == 0 and "'state': <'ready'>" in status.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to call as another uid")
def test_another_uid_is_refused_but_may_introspect(ready_daemon: BusDaemon) -> None:
    for method, args in (("Status", ()), ("Start", ("{}",)), ("Stop", ()), ("Acquire", ("x",))):
        refused = gdbus(ready_daemon, method, *args, as_nobody=True)
        assert refused.returncode != 0, f"{method} was allowed for nobody: {refused.stdout}"
        assert AccessDenied.dbus_name() in refused.stderr, refused.stderr
    prop = busctl(ready_daemon, "get-property", INTERFACE, "Environment", as_nobody=True)
    assert prop.returncode != 0 and "only uid" in prop.stderr
    everything = tool(
        ready_daemon,
        "busctl",
        "--user",
        "call",
        BUS_NAME,
        "/",
        "org.freedesktop.DBus.ObjectManager",
        "GetManagedObjects",
        as_nobody=True,
    )
    assert everything.returncode != 0 and "only uid" in everything.stderr
    # What the object looks like is no secret.
    introspected = tool(
        ready_daemon,
        "gdbus",
        "introspect",
        "--session",
        "--dest",
        BUS_NAME,
        "--object-path",
        OBJECT_PATH,
        as_nobody=True,
    )
    assert introspected.returncode == 0 and "Acquire" in introspected.stdout
    # And the daemon's own user still gets in; nothing was stopped.
    mine = gdbus(ready_daemon, "Status")
    assert mine.returncode == 0 and "'state': <'ready'>" in mine.stdout
    assert ready_daemon.proc.poll() is None
