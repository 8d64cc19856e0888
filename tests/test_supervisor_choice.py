"""Start/Restart with the settings an application chooses (issue 15), through fake ports.

What a user sees: a runtime nobody uses yet is (re)started with the profile,
env and GPU the first client asks for; one in use refuses a different ask
with every differing key named, and is left running as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fakes import Harness, base_config

from cxrd.core.choice import Choice
from cxrd.core.states import State
from cxrd.errors import Busy, ConfigMismatch, InvalidArgs, ProfileMismatch

ISAACLAB_JS = Choice(
    profile="auto-webrtc",
    env={"NV_CXR_ENABLE_PUSH_DEVICES": "0", "NV_ENABLE_POSE_WAIT": "0"},
    gpu=1,
)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(base_config(tmp_path))
    yield harness
    harness.close()


def _come_up(h: Harness) -> None:
    for _ in range(3):
        h.ready("runtime")
        h.ready("proxy")


def test_the_first_client_gets_its_env_and_gpu_from_a_daemon_that_started_alone(
    h: Harness,
) -> None:
    h.bring_up()
    first = h.world.alive("runtime")[0].pid
    start = h.call(lambda: h.sup.start(choice=ISAACLAB_JS, by=":1.7 (pid 42)"))
    _come_up(h)
    assert start.done() and start.exception() is None
    env = h.world.env_published[-1]
    assert env["NV_DEVICE_PROFILE"] == "auto-webrtc"
    assert env["NV_CXR_ENABLE_PUSH_DEVICES"] == "0" and env["NV_ENABLE_POSE_WAIT"] == "0"
    assert env["NV_CXR_GPU_INDEX_CUDA"] == "1"
    assert h.world.alive("runtime")[0].pid != first, "restarted into the asked settings"
    snap = h.sup.snapshot()
    assert snap.gpu == 1 and snap.device_profile == "auto-webrtc"
    assert snap.requested == {
        "device_profile": "auto-webrtc",
        "gpu": "1",
        "NV_CXR_ENABLE_PUSH_DEVICES": "0",
        "NV_ENABLE_POSE_WAIT": "0",
    }
    assert snap.requested_by == ":1.7 (pid 42)"


def test_a_runtime_in_use_refuses_other_settings_naming_each_key_and_keeps_running(
    h: Harness,
) -> None:
    h.bring_up()
    h.call(lambda: h.sup.start(choice=ISAACLAB_JS))
    _come_up(h)
    pid = h.sup.snapshot().runtime.pid
    other = Choice(profile="AUTO-WEBRTC", env={"NV_CXR_ENABLE_PUSH_DEVICES": "1"}, gpu=0)
    start = h.call(lambda: h.sup.start(choice=other))
    with pytest.raises(ConfigMismatch) as caught:
        start.result()
    text = str(caught.value)
    assert "gpu: running '1', requested '0'" in text
    assert "NV_CXR_ENABLE_PUSH_DEVICES: running '0', requested '1'" in text
    assert "device_profile" not in text, "profiles compare case-insensitively"
    assert h.sup.snapshot().runtime.pid == pid and h.sup.state is State.READY


def test_a_matching_request_is_simply_answered(h: Harness) -> None:
    h.bring_up()
    h.call(lambda: h.sup.start(choice=ISAACLAB_JS))
    _come_up(h)
    pid = h.sup.snapshot().runtime.pid
    same = Choice(profile="Auto-WebRTC", env={"NV_ENABLE_POSE_WAIT": "0"})
    assert h.call(lambda: h.sup.start(choice=same)).result() is None
    assert h.sup.snapshot().runtime.pid == pid


def test_only_the_profile_differing_is_still_profile_mismatch(h: Harness) -> None:
    h.bring_up()
    h.call(lambda: h.sup.start()).result()
    with pytest.raises(ProfileMismatch, match="device_profile: running 'Quest3'"):
        h.call(lambda: h.sup.start(choice=Choice(profile="AppleVisionPro"))).result()


def test_a_lease_alone_does_not_claim_the_runtime(h: Harness) -> None:
    h.bring_up()
    h.sup.acquire(":1.5", 5, "lease() before its Start")
    start = h.call(lambda: h.sup.start(choice=Choice(profile="AppleVisionPro")))
    _come_up(h)
    assert start.exception() is None
    assert h.sup.snapshot().device_profile == "AppleVisionPro"


def test_acquire_on_a_daemon_that_is_stopping_is_busy(h: Harness) -> None:
    h.bring_up()
    h.sup.request_stop("idle")
    with pytest.raises(Busy):
        h.sup.acquire(":1.5", 5, "too late")
    assert h.stop_and_wait() == 0


def test_a_request_for_reserved_keys_is_refused_naming_them(h: Harness) -> None:
    h.bring_up()
    pid = h.sup.snapshot().runtime.pid
    bad = Choice(env={"XR_RUNTIME_JSON": "/x", "NV_CXR_SERVER_PORT": "1", "NV_DEVICE_PROFILE": "q"})
    with pytest.raises(InvalidArgs) as caught:
        h.call(lambda: h.sup.start(choice=bad)).result()
    for key in ("XR_RUNTIME_JSON", "NV_CXR_SERVER_PORT", "NV_DEVICE_PROFILE"):
        assert key in str(caught.value)
    assert h.sup.snapshot().runtime.pid == pid


def test_restart_changes_only_the_keys_it_names(h: Harness) -> None:
    h.bring_up()
    h.call(lambda: h.sup.start(choice=ISAACLAB_JS))
    _come_up(h)
    h.call(lambda: h.sup.restart(choice=Choice(gpu=0)))
    _come_up(h)
    snap = h.sup.snapshot()
    assert snap.gpu == 0 and snap.device_profile == "auto-webrtc"
    assert h.world.env_published[-1]["NV_CXR_ENABLE_PUSH_DEVICES"] == "0"


def test_a_reload_keeps_the_clients_choice_unless_the_file_changes_that_key(h: Harness) -> None:
    h.bring_up()
    h.call(lambda: h.sup.start(choice=ISAACLAB_JS))
    _come_up(h)
    rt = h.config.runtime
    edited = replace(h.config, runtime=replace(rt, env={"NV_ENABLE_POSE_WAIT": "1"}, gpu=None))
    reload = h.reload_with(edited)
    _come_up(h)
    assert reload.done() and reload.exception() is None
    env = h.world.env_published[-1]
    assert env["NV_ENABLE_POSE_WAIT"] == "1", "the file changed this key: the file wins"
    assert env["NV_CXR_ENABLE_PUSH_DEVICES"] == "0" and env["NV_DEVICE_PROFILE"] == "auto-webrtc"
    assert h.sup.snapshot().gpu == 1


def test_asking_for_what_the_runtime_has_by_default_matches(h: Harness) -> None:
    h.bring_up()
    h.call(lambda: h.sup.start()).result()  # in use, as configured
    pid = h.sup.snapshot().runtime.pid
    default = Choice(env={"NV_CXR_ENABLE_PUSH_DEVICES": "true"}, profile="quest3")
    assert h.call(lambda: h.sup.start(choice=default)).result() is None
    assert h.sup.snapshot().runtime.pid == pid
