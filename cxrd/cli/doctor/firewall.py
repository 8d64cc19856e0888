"""Does an active firewalld, ufw or nftables ruleset keep headsets from cxrd's ports?

Read-only, and asked in the order one manages the other: firewalld when it
runs (it owns the nftables ruleset then), else ufw when active, else the bare
nftables ruleset. ``ufw status`` and ``nft list ruleset`` need root; without it
the check says it cannot tell, and how to look. The fix is the shipped
firewalld service or ufw profile when they cover what is closed (they name the
default ports), else the ports themselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence

from cxrd import constants as C
from cxrd.cli.doctor.check import TIMEOUT, Check
from cxrd.cli.doctor.nftables import Chain, Port, blocking_chain
from cxrd.config import Config

NAME = "firewall"
FIREWALLD_SERVICE = "cloudxr"
UFW_PROFILE = "CloudXR"
# What packaging/firewalld/cloudxr.xml and packaging/ufw/cloudxr open.
SHIPPED: frozenset[Port] = frozenset(
    {(C.DEFAULT_PROXY_PORT, "tcp"), (C.DEFAULT_BACKEND_PORT, "tcp"), (C.DEFAULT_MEDIA_PORT, "udp")}
)
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")  # not on a user's PATH on Debian


def headset_ports(config: Config) -> list[Port]:
    ports = [(config.runtime.signaling_port, "tcp"), (config.runtime.media_port, "udp")]
    return ([(config.proxy.port, "tcp")] if config.proxy.enabled else []) + ports


def _label(ports: Sequence[Port]) -> str:
    return ", ".join(f"{number}/{proto}" for number, proto in ports)


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str] | None:
    """The tool's answer (C locale: ufw translates its output), or None when it is not installed."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    exe = shutil.which(tool, path=path)
    if exe is None:
        return None
    env = {**os.environ, "LC_ALL": "C"}
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
    )


def covers(spec: str, port: Port) -> bool:
    """Whether a port spec of ufw (``48322,49100/tcp``, ``47998:48000/udp``, ``22``) or
    firewalld (``47998-48000/udp``) includes ``port``."""
    numbers, _, proto = spec.partition("/")
    if proto and proto != port[1]:
        return False
    for item in numbers.split(","):
        low, _, high = item.replace("-", ":").partition(":")
        if low.isdigit() and int(low) <= port[0] <= int(high or low):
            return True
    return False


def _firewalld_field(text: str, field: str) -> list[str]:
    found = re.search(rf"^\s*{field}:(.*)$", text, re.MULTILINE)
    return found.group(1).split() if found else []


def _firewalld_service_ports(service: str) -> list[str] | None:
    info = _run("firewall-cmd", f"--info-service={service}")
    if info is None or info.returncode != 0:
        return None
    return _firewalld_field(info.stdout, "ports")


def _firewalld(ports: list[Port]) -> Check | None:
    state = _run("firewall-cmd", "--state")
    if state is None or state.stdout.strip() != "running":
        return None
    listing = _run("firewall-cmd", "--list-all")
    assert listing is not None
    if listing.returncode != 0:
        return Check(
            NAME,
            "warn",
            f"firewalld runs, but listing its default zone failed: cannot tell whether it "
            f"blocks {_label(ports)} ({(listing.stderr or listing.stdout).strip()})",
            "sudo firewall-cmd --list-all",
        )
    zone = listing.stdout.split(maxsplit=1)[0]
    if _firewalld_field(listing.stdout, "target") == ["ACCEPT"]:
        return Check(NAME, "ok", f"firewalld's zone {zone} accepts everything")
    specs = _firewalld_field(listing.stdout, "ports")
    for service in _firewalld_field(listing.stdout, "services"):
        specs += _firewalld_service_ports(service) or []
    closed = [port for port in ports if not any(covers(spec, port) for spec in specs)]
    if not closed:
        return Check(NAME, "ok", f"firewalld's zone {zone} opens {_label(ports)}")
    if set(closed) <= SHIPPED and _firewalld_service_ports(FIREWALLD_SERVICE) is not None:
        opening = f"--add-service={FIREWALLD_SERVICE}"
    else:
        opening = " ".join(f"--add-port={number}/{proto}" for number, proto in closed)
    return Check(
        NAME,
        "fail",
        f"firewalld's zone {zone} blocks {_label(closed)}: headsets cannot reach cxrd",
        f"sudo firewall-cmd --permanent {opening} && sudo firewall-cmd --reload",
    )


def _ufw_rules(status: str) -> list[tuple[str, str]]:
    """(to, action) of each IPv4 incoming rule, in ufw's order (the first match wins)."""
    rules = []
    _, _, table = status.partition("\n--")
    for line in table.splitlines()[1:]:
        columns = re.split(r"\s{2,}", line.strip())
        if len(columns) < 3 or "(v6)" in columns[0] or columns[1].endswith(("OUT", "FWD")):
            continue
        rules.append((columns[0].split(" on ")[0], columns[1]))  # `22/tcp on eth0`
    return rules


def _ufw_profile_ports(profile: str) -> list[str]:
    info = _run("ufw", "app", "info", profile)
    if info is None or info.returncode != 0:
        return []
    _, _, listed = info.stdout.partition("\nPort")
    return [line.strip() for line in listed.splitlines()[1:] if line.strip()]


def _ufw_allows(rules: list[tuple[str, str]], default: str, port: Port) -> bool:
    for to, action in rules:
        specs = [to] if to[:1].isdigit() else _ufw_profile_ports(to)
        if to == "Anywhere" or any(covers(spec, port) for spec in specs):
            return action.startswith(("ALLOW", "LIMIT"))
    return default == "allow"


def _ufw(ports: list[Port]) -> Check | None:
    status = _run("ufw", "status", "verbose")
    if status is None:
        return None
    if status.returncode != 0:
        return Check(
            NAME,
            "warn",
            f"ufw is installed but `ufw status` needs root: cannot tell whether it blocks "
            f"{_label(ports)}",
            f"look: sudo ufw status verbose; open them: {_ufw_fix(ports)}",
        )
    if not status.stdout.startswith("Status: active"):
        return None
    default = re.search(r"^Default: (\w+) \(incoming\)", status.stdout, re.MULTILINE)
    rules = _ufw_rules(status.stdout)
    closed = [p for p in ports if not _ufw_allows(rules, default[1] if default else "deny", p)]
    if not closed:
        return Check(NAME, "ok", f"ufw is active and allows {_label(ports)}")
    return Check(
        NAME, "fail", f"ufw blocks {_label(closed)}: headsets cannot reach cxrd", _ufw_fix(closed)
    )


def _ufw_fix(closed: list[Port]) -> str:
    if set(closed) <= SHIPPED and _ufw_profile_ports(UFW_PROFILE):
        return f"sudo ufw allow {UFW_PROFILE}"
    return " && ".join(f"sudo ufw allow {number}/{proto}" for number, proto in closed)


def _nftables(ports: list[Port]) -> Check | None:
    listing = _run("nft", "-j", "list", "ruleset")
    if listing is None:
        return None
    if listing.returncode != 0:
        return Check(
            NAME,
            "warn",
            f"`nft list ruleset` needs root: cannot tell whether nftables blocks {_label(ports)} "
            f"({(listing.stderr.strip() or 'no reason given').splitlines()[0]})",
            "look: sudo nft list ruleset",
        )
    ruleset = json.loads(listing.stdout or "{}")
    by_chain: dict[Chain, list[Port]] = {}
    for port in ports:
        if (chain := blocking_chain(ruleset, port)) is not None:
            by_chain.setdefault(chain, []).append(port)
    if not by_chain:
        return None
    where = "; ".join(f"{c} drops {_label(p)}" for c, p in by_chain.items())
    return Check(
        NAME,
        "fail",
        f"nftables chain {where}: headsets cannot reach cxrd",
        " && ".join(c.insert_accept(p) for c, p in by_chain.items())
        + "  (and in /etc/nftables.conf to keep it)",
    )


def check_firewall(config: Config) -> Check:
    ports = headset_ports(config)
    for probe in (_firewalld, _ufw, _nftables):
        found = probe(ports)
        if found is not None:
            return found
    return Check(NAME, "ok", f"no active firewalld, ufw or nftables rule blocks {_label(ports)}")
