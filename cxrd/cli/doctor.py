"""``cxrctl doctor``: what stands between this user and a running CloudXR, and the fix.

Each check looks at the real thing (the bus, the user manager, the unit it
loaded, the driver libraries the linker would find, the port's holder, the
certificate's dates) and says ok, warn or fail with the command that fixes it.
Checks never start the daemon (bus calls carry NO_AUTOSTART) and never change
anything. One broken check is reported as a failure of that check; the others
still run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import errno
import glob
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dbus_fast import Message, MessageFlag, MessageType

from cxrd import constants as C
from cxrd.config import Config
from cxrd.dbus.connection import CONNECT_ERRORS, connect, session_bus_address
from cxrd.errors import CxrdError
from cxrd.system import eula

Level = Literal["ok", "warn", "fail"]

_TIMEOUT = 5.0
CERT_WARN_DAYS = 30
DRIVER_LIBS = ("libcuda.so.1", "libvulkan.so.1")


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    message: str
    fix: str = ""


@dataclass
class _BusFacts:
    """What the session bus says, gathered once for several checks."""

    address: str | None = None
    error: str | None = None
    activatable: bool = False
    daemon_pid: int = 0  # 0: the bus name has no owner
    child_pids: set[int] = field(default_factory=set)  # RuntimePid, ProxyPid


def run_checks(config: Config) -> list[Check]:
    """Every check, in the order a person would fix them."""
    bus = _probe_bus()
    checks: list[Callable[[], Check]] = [
        lambda: _check_session_bus(bus),
        _check_user_manager,
        _check_unit,
        lambda: _check_activation(bus),
        lambda: _check_runtime_package(config),
        lambda: _check_eula(config),
        lambda: _check_driver_libs(config),
        lambda: _check_gpu(config),
        lambda: _check_port(config, "proxy port", config.proxy.port, "proxy.port", bus),
        lambda: _check_port(
            config, "runtime port", config.proxy.backend_port, "proxy.backend_port", bus
        ),
        lambda: _check_certificate(config),
        lambda: _check_run_dir(config),
        _check_lingering,
    ]
    results = []
    for check in checks:
        try:
            results.append(check())
        except Exception as exc:  # a diagnostic must report, not crash
            name = getattr(check, "__name__", "check").removeprefix("_check_")
            results.append(Check(name, "fail", f"the check itself failed: {exc!r}", ""))
    return results


# --- session bus and D-Bus activation -------------------------------------------


def _probe_bus() -> _BusFacts:
    address = session_bus_address()
    if address is None:
        return _BusFacts(error="DBUS_SESSION_BUS_ADDRESS is unset and $XDG_RUNTIME_DIR/bus absent")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(asyncio.run, _ask_bus(address))
        try:
            return future.result(timeout=_TIMEOUT * 2)
        except concurrent.futures.TimeoutError:
            return _BusFacts(address=address, error="the bus did not answer in time")


async def _ask_bus(address: str) -> _BusFacts:
    facts = _BusFacts(address=address)
    try:
        bus = await connect(address, timeout=_TIMEOUT)
    except CONNECT_ERRORS as exc:
        facts.error = f"cannot connect to {address}: {exc}"
        return facts

    async def call(
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[object] = (),
    ) -> list[object] | None:
        reply = await bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
                flags=MessageFlag.NO_AUTOSTART,
            )
        )
        if reply is None or reply.message_type == MessageType.ERROR:
            return None
        return list(reply.body)

    dbus = (C.DBUS, C.DBUS_PATH, C.DBUS)
    try:
        async with asyncio.timeout(_TIMEOUT):
            names = await call(*dbus, "ListActivatableNames")
            facts.activatable = bool(names) and C.BUS_NAME in names[0]  # type: ignore[index,operator]
            pid = await call(*dbus, "GetConnectionUnixProcessID", "s", [C.BUS_NAME])
            facts.daemon_pid = int(pid[0]) if pid else 0  # type: ignore[call-overload]
            if facts.daemon_pid:
                for prop in ("RuntimePid", "ProxyPid"):
                    value = await call(
                        C.BUS_NAME,
                        C.OBJECT_PATH,
                        C.PROPERTIES,
                        "Get",
                        "ss",
                        [C.INTERFACE, prop],
                    )
                    if value:
                        facts.child_pids.add(int(value[0].value))  # type: ignore[attr-defined]
    except TimeoutError:
        facts.error = "the bus did not answer in time"
    finally:
        bus.disconnect()
    facts.child_pids.discard(0)
    return facts


def _check_session_bus(bus: _BusFacts) -> Check:
    fix = (
        "log in through a session with a user bus (apt install dbus-user-session), or "
        "export DBUS_SESSION_BUS_ADDRESS=unix:path=$XDG_RUNTIME_DIR/bus"
    )
    if bus.error is not None:
        return Check("session bus", "fail", bus.error, fix)
    running = f"cxrd is running (pid {bus.daemon_pid})" if bus.daemon_pid else "cxrd not running"
    return Check("session bus", "ok", f"{bus.address}; {running}")


def _check_activation(bus: _BusFacts) -> Check:
    if bus.error is not None:
        return Check(
            "D-Bus activation", "warn", "no session bus to ask", "see the session bus check"
        )
    if bus.activatable:
        return Check("D-Bus activation", "ok", f"{C.BUS_NAME} starts on demand")
    return Check(
        "D-Bus activation",
        "warn",
        f"the bus has no activation file for {C.BUS_NAME}: clients cannot start cxrd on demand",
        "cxrctl install",
    )


# --- systemd --------------------------------------------------------------------


def _systemctl(*args: str) -> subprocess.CompletedProcess[str] | None:
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return None
    try:
        return subprocess.run(
            [systemctl, "--user", "--no-pager", *args],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None


def _check_user_manager() -> Check:
    fix = "log in through PAM with systemd (libpam-systemd), or run `cxrd` in the foreground"
    result = _systemctl("is-system-running")
    if result is None:
        return Check("user manager", "warn", "systemctl not found or not answering", fix)
    state = result.stdout.strip()
    if state in ("running", "degraded", "starting", "initializing"):
        level: Level = "ok" if state != "degraded" else "warn"
        fixing = "" if level == "ok" else "systemctl --user --failed shows which unit failed"
        return Check("user manager", level, f"systemd --user is {state}", fixing)
    reason = (result.stderr.strip().splitlines() or [state or "no answer"])[-1]
    return Check("user manager", "warn", f"no systemd user manager: {reason}", fix)


def _check_unit() -> Check:
    result = _systemctl(
        "show", C.UNIT_NAME, "--property=LoadState,FragmentPath,NeedDaemonReload,ActiveState"
    )
    if result is None or result.returncode != 0:
        path = _find_unit_file()
        if path is None:
            return Check("unit", "fail", f"{C.UNIT_NAME} is not installed", "cxrctl install")
        return _unit_currency(path, "(user manager not reachable)")
    props = dict(line.partition("=")[::2] for line in result.stdout.splitlines())
    if props.get("LoadState") != "loaded":
        return Check(
            "unit",
            "fail",
            f"{C.UNIT_NAME} is {props.get('LoadState') or 'unknown'}",
            "cxrctl install (then it loads at once)",
        )
    if props.get("NeedDaemonReload") == "yes":
        return Check(
            "unit",
            "warn",
            f"{props['FragmentPath']} changed on disk since it was loaded",
            "systemctl --user daemon-reload",
        )
    return _unit_currency(Path(props["FragmentPath"]), props.get("ActiveState", ""))


def _find_unit_file() -> Path | None:
    """Where ``cxrctl install`` (for this user, /usr/local or /usr) or an admin put the unit."""
    from cxrd.cli.install import Layout

    for path in (
        Layout.for_prefix(None).unit,
        Path("/etc/systemd/user") / C.UNIT_NAME,
        Layout.for_prefix(Path("/usr/local")).unit,
        Layout.for_prefix(Path("/usr")).unit,
    ):
        if path.is_file():
            return path
    return None


def _unit_currency(path: Path, active: str) -> Check:
    argv = unit_exec_argv(path.read_text(encoding="utf-8"))
    if argv and runs_this_interpreter(argv):
        return Check("unit", "ok", f"{path} ({active}) runs this cxrd")
    shown = " ".join(argv) if argv else "no ExecStart="
    return Check(
        "unit",
        "warn",
        f"{path} runs `{shown}`, not the cxrd of {sys.executable}",
        "cxrctl install (writes a unit for this Python), or run cxrctl from that installation",
    )


def unit_exec_argv(text: str) -> list[str]:
    """The last ``ExecStart=`` of a unit file as argv (specifier and ``$$`` escapes undone)."""
    value = ""
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            value = line.removeprefix("ExecStart=").lstrip("-@:+!")
    try:
        words = shlex.split(value)
    except ValueError:
        return []
    return [
        w.replace("%%", "%") if i == 0 else w.replace("%%", "%").replace("$$", "$")
        for i, w in enumerate(words)
    ]


def runs_this_interpreter(argv: Sequence[str]) -> bool:
    """``<this python> -m cxrd``, or a ``cxrd`` script whose ``#!`` is this python."""
    me = os.path.abspath(sys.executable)
    if list(argv[1:3]) == ["-m", "cxrd"]:
        return os.path.abspath(argv[0]) == me
    script = Path(argv[0])
    try:
        # /usr/bin/cxrd is a link to the venv's script; the script names its python.
        with open(script.resolve(), "rb") as handle:
            first = handle.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return False
    return first.startswith("#!") and os.path.abspath(first[2:].split()[0]) == me


def _check_lingering() -> Check:
    user = pwd.getpwuid(os.getuid()).pw_name
    fix = f"loginctl enable-linger {user}"
    if Path("/var/lib/systemd/linger", user).exists():
        return Check("lingering", "ok", f"{user}'s services keep running without a login")
    loginctl = shutil.which("loginctl")
    if loginctl is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            result = subprocess.run(
                [loginctl, "show-user", user, "--property=Linger", "--value"],
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
                check=False,
            )
            if result.stdout.strip() == "yes":
                return Check("lingering", "ok", f"{user}'s services keep running without a login")
    return Check(
        "lingering",
        "warn",
        "cxrd stops when your last session ends; a headless machine needs lingering",
        fix,
    )


# --- the runtime and the GPU ----------------------------------------------------


def _check_runtime_package(config: Config) -> Check:
    backend = config.runtime.backend
    if backend == "sim":
        return Check("runtime package", "ok", "sim backend: the simulator needs no runtime")
    # What the daemon's backend sees: its own environment with runtime.env on top.
    seen = {**os.environ, **config.runtime.env}
    if backend == "command":
        from cxrd.runtimes.command import resolve_program

        try:
            found = resolve_program(config.runtime.command[0], seen.get("PATH", os.defpath))
        except CxrdError as exc:
            return Check("runtime package", "fail", str(exc), "fix runtime.command in cxrd.toml")
        return Check("runtime package", "ok", f"runtime.command runs {found}")
    from cxrd.runtimes import isaacteleop

    try:
        sub, native = isaacteleop.find_runtime(seen)
    except CxrdError as exc:
        return Check("runtime package", "fail", str(exc), type(exc).hint)
    return Check("runtime package", "ok", f"{isaacteleop.PACKAGE}.{sub} at {native}")


def _check_eula(config: Config) -> Check:
    if config.runtime.backend != "isaacteleop":
        return Check("EULA", "ok", f"not needed by the {config.runtime.backend} backend")
    if eula.is_accepted(config.install_path):
        return Check("EULA", "ok", f"accepted ({eula.marker_path(config.install_path)})")
    return Check(
        "EULA",
        "fail",
        f"the NVIDIA CloudXR EULA is not accepted ({eula.EULA_URL})",
        "cxrctl accept-eula",
    )


def find_shared_library(soname: str) -> str | None:
    """Where the dynamic linker would find ``soname`` (LD_LIBRARY_PATH, then ld.so.cache)."""
    for directory in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")):
        if os.path.exists(os.path.join(directory, soname)):
            return os.path.join(directory, soname)
    ldconfig = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None
    )
    if ldconfig is None:
        return None
    try:
        cache = subprocess.run(
            [ldconfig, "-p"], capture_output=True, text=True, timeout=_TIMEOUT, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in cache.splitlines():
        name, _, rest = line.strip().partition(" ")
        if name == soname and "=>" in rest:
            return rest.split("=>", 1)[1].strip()
    return None


def _check_driver_libs(config: Config) -> Check:
    missing = [lib for lib in DRIVER_LIBS if find_shared_library(lib) is None]
    if not missing:
        return Check("NVIDIA libraries", "ok", ", ".join(DRIVER_LIBS) + " found")
    needed = config.runtime.backend == "isaacteleop"
    return Check(
        "NVIDIA libraries",
        "fail" if needed else "warn",
        f"{', '.join(missing)} not found: the real CloudXR runtime cannot start"
        + ("" if needed else f" (the {config.runtime.backend} backend does not need it)"),
        "install the NVIDIA driver (libcuda.so.1) and the Vulkan loader (apt install libvulkan1)",
    )


def _check_gpu(config: Config) -> Check:
    devices = sorted(d for d in glob.glob("/dev/nvidia[0-9]*") if d[len("/dev/nvidia") :].isdigit())
    if devices:
        version = ""
        with contextlib.suppress(OSError):
            first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
            version = f"; {first.split('  ')[0].strip()}"
        return Check("GPU", "ok", f"{len(devices)} NVIDIA GPU(s): {', '.join(devices)}{version}")
    needed = config.runtime.backend == "isaacteleop"
    return Check(
        "GPU",
        "fail" if needed else "warn",
        "no /dev/nvidia0: no NVIDIA GPU, or its driver is not loaded",
        "install and load the NVIDIA driver (nvidia-smi should list the GPU)",
    )


# --- ports, certificate, files --------------------------------------------------


def _ancestors(pid: int) -> set[int]:
    seen: set[int] = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            stat_line = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat_line.rsplit(")", 1)[1].split()[1])
    return seen


def _check_port(config: Config, name: str, port: int, key: str, bus: _BusFacts) -> Check:
    from cxrd.system.listeners import port_holder

    if key == "proxy.port" and not config.proxy.enabled:
        return Check(name, "ok", "the proxy is disabled")
    holder = port_holder(port)
    if holder is not None:
        pid, process = holder
        ours = bus.daemon_pid and (pid in bus.child_pids or bus.daemon_pid in _ancestors(pid))
        if ours:
            return Check(name, "ok", f"{port} is held by cxrd's {process} (pid {pid})")
        return Check(
            name,
            "fail",
            f"{port} is taken by pid {pid} ({process})",
            f"stop that process, or set {key} in cxrd.toml",
        )
    host = config.proxy.host if key == "proxy.port" else "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return Check(
                    name,
                    "fail",
                    f"{port} is taken by a process cxrd cannot see",
                    f"set {key} in cxrd.toml",
                )
            return Check(
                name,
                "fail",
                f"cannot bind {host}:{port}: {exc.strerror}",
                f"set {key} (or proxy.host) in cxrd.toml",
            )
    return Check(name, "ok", f"{port} is free")


def _check_certificate(config: Config) -> Check:
    from cxrd.proxy.certs import validate_pair

    if not config.proxy.enabled:
        return Check("certificate", "ok", "the proxy is disabled")
    if config.proxy.cert is not None and config.proxy.key is not None:
        cert, key = Path(config.proxy.cert).expanduser(), Path(config.proxy.key).expanduser()
        renew = f"renew {cert} (or remove proxy.cert/proxy.key to use a generated one)"
    else:
        cert, key = config.certs_dir / C.CERT_FILE, config.certs_dir / C.KEY_FILE
        renew = f"rm {cert} {key}  (a new pair is generated on the next start)"
        if not cert.exists() and not key.exists():
            return Check("certificate", "ok", f"none yet; generated in {config.certs_dir} on start")
    try:
        info = validate_pair(cert, key)
    except CxrdError as exc:
        return Check("certificate", "fail", str(exc), renew)
    left = info.not_after - dt.datetime.now(dt.UTC)
    until = f"{info.not_after:%Y-%m-%d}"
    if left < dt.timedelta(days=CERT_WARN_DAYS):
        return Check("certificate", "warn", f"{cert} expires in {left.days} days ({until})", renew)
    return Check("certificate", "ok", f"{cert} valid until {until} ({left.days} days)")


def _check_run_dir(config: Config) -> Check:
    run_dir = config.run_dir
    try:
        info = run_dir.stat()
    except FileNotFoundError:
        return Check("run dir", "ok", f"{run_dir} is created (0700) on first start")
    fix = f"chmod 700 {shlex.quote(str(run_dir))}"
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.getuid():
        return Check(
            "run dir",
            "fail",
            f"{run_dir} belongs to uid {info.st_uid}, not you",
            f"chown {os.getuid()} {shlex.quote(str(run_dir))}; {fix}",
        )
    if mode != 0o700:
        return Check(
            "run dir", "fail", f"{run_dir} is {mode:04o}; others could reach the runtime", fix
        )
    return Check("run dir", "ok", f"{run_dir} is 0700 and yours")
