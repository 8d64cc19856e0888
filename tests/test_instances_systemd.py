"""Three named instances under one real `systemd --user`, each with its own ports, GPU and files.

One long test on purpose: starting three sim daemons is the slow part, and
every check below reads the same three running instances.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from fixtures_systemd import UserManager
from support import TIMEOUT, free_port, wait_until
from websockets.sync.client import connect

from cxrd import constants as C
from cxrd import errors

CXRCTL = str(Path(sys.executable).parent / "cxrctl")
NAMES = ("left", "right", "bench")


def configure(manager: UserManager, name: str, gpu: int, signaling: int) -> dict[str, int]:
    ports = {"proxy": free_port(), "signaling": signaling, "media": free_port()}
    path = manager.config_home / "cxrd" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'[runtime]\nbackend = "sim"\ngpu = {gpu}\nsignaling_port = {ports["signaling"]}\n'
        f"media_port = {ports['media']}\n[runtime.sim]\nstartup_delay = 0.0\n"
        f'[proxy]\nhost = "127.0.0.1"\nport = {ports["proxy"]}\n'
    )
    return ports


def cxrctl(manager: UserManager, *args: str, check: bool = True) -> Any:
    return manager.run(CXRCTL, *args, check=check, timeout=TIMEOUT * 3)


def status(manager: UserManager, name: str) -> dict[str, Any]:
    # Exit 1 while restarting: the JSON says what it is either way.
    out = cxrctl(manager, "-i", name, "status", "--json", check=False).stdout
    return dict(json.loads(out))


def pids(snap: dict[str, Any]) -> tuple[int, int]:
    return snap["runtime"]["pid"], snap["proxy"]["pid"]


def hello_through_proxy(snap: dict[str, Any], install: Path) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(install / C.CERTS_DIR / C.CERT_FILE))
    context.check_hostname = False
    url = f"wss://127.0.0.1:{snap['proxy']['port']}/sim"
    with connect(url, ssl=context, open_timeout=TIMEOUT) as ws:
        return dict(json.loads(ws.recv(timeout=TIMEOUT)))


def test_three_instances_run_side_by_side_and_stop_and_crash_alone(
    systemd_user: UserManager,
) -> None:
    m = systemd_user
    ports = {name: configure(m, name, gpu, free_port()) for gpu, name in enumerate(NAMES)}
    for name in NAMES:
        cxrctl(m, "install", "--instance", name)
    logs = m.root / "cxrd-%i.stderr"
    m.write_dropin(C.UNIT_TEMPLATE, "test-log", f"[Service]\nStandardError=append:{logs}\n")
    m.systemctl("daemon-reload")

    m.systemctl("start", *(f"cloudxr@{name}" for name in NAMES), timeout=TIMEOUT * 6)
    snaps = {name: status(m, name) for name in NAMES}
    for gpu, name in enumerate(NAMES):
        snap, install = snaps[name], m.home / f".cloudxr-{name}"
        assert snap["state"] == "ready", (name, snap)
        assert (snap["instance"], snap["gpu"], snap["install_dir"]) == (name, gpu, str(install))
        assert snap["signaling_port"] == ports[name]["signaling"]
        assert snap["proxy"]["port"] == ports[name]["proxy"]
        published = (install / C.RUN_DIR / C.ENV_FILE).read_text()
        assert f"{C.GPU_CUDA_ENV}={gpu}" in published
        assert f"{C.SERVER_PORT_ENV}={ports[name]['signaling']}" in published
        assert f"{C.MEDIA_PORT_ENV}={ports[name]['media']}" in published
        # A headset's WebSocket through this instance's proxy reaches this instance's sim.
        reached = hello_through_proxy(snap, install)["runtime_env"]
        assert reached[C.SERVER_PORT_ENV] == str(ports[name]["signaling"])
        assert reached[C.GPU_CUDA_ENV] == str(gpu)
        assert reached["CXR_INSTALL_DIR"] == str(install)

    listed = json.loads(cxrctl(m, "instances", "--json").stdout)
    by_name = {row["name"]: row for row in listed}
    assert set(NAMES) <= set(by_name), listed
    assert by_name["right"]["state"] == "ready"
    assert by_name["right"]["gpu"] == 1
    assert by_name["right"]["signaling_port"] == ports["right"]["signaling"]
    assert by_name["right"]["pid"] == snaps["right"]["runtime"]["pid"]
    text = cxrctl(m, "-i", "right", "status").stdout
    assert "right" in text and "CUDA 1" in text, text

    # Stopping one leaves the others' processes alone...
    m.systemctl("stop", "cloudxr@bench", timeout=TIMEOUT * 3)
    for name in ("left", "right"):
        assert pids(status(m, name)) == pids(snaps[name])
    # ...and a bare bus call activates it again, through its own activation file.
    m.busctl(
        "call",
        "io.github.cxrd.Daemon1.bench",
        C.OBJECT_PATH,
        C.INTERFACE,
        "Start",
        "a{sv}",
        "0",
        timeout=TIMEOUT * 3,
    )
    assert status(m, "bench")["state"] == "ready"

    # A crash of right's runtime is right's alone.
    os.kill(snaps["right"]["runtime"]["pid"], signal.SIGKILL)

    def restarted() -> bool:
        snap = status(m, "right")
        return snap["state"] == "ready" and pids(snap)[0] != snaps["right"]["runtime"]["pid"]

    wait_until(restarted, what="right's runtime to be restarted", interval=0.2)
    assert pids(status(m, "left")) == pids(snaps["left"])

    # A fourth instance on a port left uses is refused before it runs anything.
    configure(m, "dup", 3, ports["left"]["signaling"])
    result = m.systemctl("start", "cloudxr@dup", check=False, timeout=TIMEOUT * 3)
    assert result.returncode != 0
    props = m.show("cloudxr@dup.service", "ExecMainStatus", "StatusText")
    assert props["ExecMainStatus"] == str(errors.StartFailed.exit_code), props
    assert "'left'" in props["StatusText"], props
    assert str(ports["left"]["signaling"]) in props["StatusText"], props
    assert pids(status(m, "left")) == pids(snaps["left"])
