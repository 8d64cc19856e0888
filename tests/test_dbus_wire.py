"""The D-Bus adapter's pure parts: wire form, option checks, error translation, contract."""

from __future__ import annotations

import pytest
from dbus_fast import DBusError, Variant
from dbus_fast.service import ServiceInterface

from cxrd.constants import INTERFACE
from cxrd.core.choice import Choice
from cxrd.core.snapshot import Lease, ProxyStatus, RuntimeStatus, Snapshot
from cxrd.core.states import State
from cxrd.dbus import wire
from cxrd.dbus.interface import FAILED, Daemon1, _translated, contract_interface, interface_shape
from cxrd.errors import InvalidArgs, ProfileMismatch

SNAP = Snapshot(
    state=State.READY,
    backend="sim",
    runtime=RuntimeStatus(
        pid=41, started_at=1700000000.5, restarts=2, last_exit="exited with code 1"
    ),
    proxy=ProxyStatus(pid=42, port=48322, url="wss://h:48322/", restarts=1, last_exit=""),
    device_profile="Quest3",
    environment={"XR_RUNTIME_JSON": "/x/openxr.json"},
    env_file="/x/run/cloudxr.env",
    logs={"runtime": "/x/logs/runtime_stderr.log"},
    install_dir="/x",
    uptime=12.5,
    last_error="runtime exited with code 1",
    version="0.1.0",
    interface_version=1,
    leases=(Lease(id="a1", holder=":1.9", pid=77, reason="lab", since=1700000001.25),),
)


def test_a_snapshot_survives_the_wire_unchanged() -> None:
    assert wire.snapshot_from_wire(wire.snapshot_to_wire(SNAP)) == SNAP


def test_a_newer_daemons_extra_keys_and_missing_keys_are_tolerated() -> None:
    data = wire.snapshot_to_wire(SNAP)
    data["added_in_v2"] = Variant("s", "whatever")
    del data["logs"]
    back = wire.snapshot_from_wire(data)
    assert back.logs == {} and back.state is State.READY


def test_properties_follow_the_snapshot() -> None:
    props = wire.property_values(SNAP)
    assert set(props) == set(wire.PROPERTY_SIGNATURES)
    assert props["Leases"] == [["a1", ":1.9", 77, "lab", 1700000001.25]]
    assert props["Restarts"] == 2 and props["State"] == "ready"
    for name, signature in wire.PROPERTY_SIGNATURES.items():
        Variant(signature, props[name])  # raises if a value does not fit its type


def test_start_options_are_checked_and_every_offender_named() -> None:
    assert wire.parse_start_options({}) == (None, Choice())
    asked = Choice(profile="AVP", env={"NV_ENABLE_POSE_WAIT": "0"}, gpu=1)
    assert wire.parse_start_options(wire.start_options(2.5, asked)) == (2.5, asked)
    with pytest.raises(InvalidArgs) as caught:
        wire.parse_start_options({"timeout": Variant("i", 3), "profile": Variant("s", "x")})
    assert "timeout" in str(caught.value) and "'profile'" in str(caught.value)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgs):
            wire.parse_start_options({"timeout": Variant("d", bad)})


def test_named_errors_keep_their_name_and_others_lose_their_traceback() -> None:
    with pytest.raises(DBusError) as named, _translated("Start"):
        raise ProfileMismatch("Quest3 vs AVP")
    assert named.value.type == ProfileMismatch.dbus_name() and named.value.text == "Quest3 vs AVP"
    with pytest.raises(DBusError) as other, _translated("Status"):
        raise KeyError("/secret/path/in/a/traceback")
    assert other.value.type == FAILED
    assert "secret" not in other.value.text and "Traceback" not in other.value.text


def test_the_handlers_have_exactly_the_contracts_types() -> None:
    # What dbus-fast builds from the decorated methods, without the XML on top.
    bare = Daemon1.__new__(Daemon1)
    ServiceInterface.__init__(bare, INTERFACE)
    served = interface_shape(ServiceInterface.introspect(bare), names=False)
    assert served == interface_shape(contract_interface(), names=False)
