"""The proxy's and the runtime's ports (free, or held by this cxrd), the proxy's certificate."""

from __future__ import annotations

import datetime as dt
import errno
import socket
from pathlib import Path

from cxrd import constants as C
from cxrd.cli.doctor.bus import BusFacts
from cxrd.cli.doctor.check import Check
from cxrd.config import Config
from cxrd.errors import CxrdError
from cxrd.proxy.static import INDEX, has_index
from cxrd.system.addresses import headset_hosts

CERT_WARN_DAYS = 30


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


def check_port(config: Config, name: str, port: int, key: str, bus: BusFacts) -> Check:
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


def check_certificate(config: Config) -> Check:
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
    missing = [h for h in headset_hosts(config.proxy.host) if h not in info.sans]
    if missing:
        fix = "cxrctl cert renew && cxrctl restart" if config.proxy.cert is None else renew
        return Check(
            "certificate",
            "warn",
            f"{cert} does not name {', '.join(missing)}: headsets using it will see a warning",
            fix,
        )
    return Check("certificate", "ok", f"{cert} valid until {until} ({left.days} days)")


def check_web_client(config: Config) -> Check:
    if not config.proxy.enabled or not config.proxy.host_client:
        return Check("web client", "ok", "not hosted (proxy.host_client = false)")
    where = config.client_path
    if not has_index(where):
        return Check(
            "web client",
            "warn",
            f"no {INDEX} in {where}: /client/ says how to get it",
            "cxrctl client fetch   (offline: cxrctl client fetch --from DIR)",
        )
    return Check("web client", "ok", f"served from {where} at /client/")
