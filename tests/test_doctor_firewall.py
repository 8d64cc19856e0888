"""`cxrctl doctor`'s firewall check against real nftables rulesets and ufw/firewalld output.

Every check runs in a throwaway network namespace (`unshare --net`, as root), so
the real `nft` reads (and the tests write) a ruleset that is not the host's.
ufw and firewalld cannot run here (no D-Bus firewalld, no iptables setup); they
are fake executables on PATH printing the output format of the real tools
(ufw 0.36 `status verbose` and `app info`, firewalld 1.x `--state`,
`--list-all` and `--info-service`) and failing the way they fail without root.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import TIMEOUT

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft", path="/usr/sbin:/sbin") is None,
    reason="needs root (for unshare --net) and nft (scripts/setup.sh installs nftables)",
)

SHIPPED = "48322/tcp, 49100/tcp, 47998/udp"
# Runs in the namespace: load the rules, check, optionally run the printed fix and check again.
CHECK_IN_NETNS = """
import dataclasses, json, subprocess, sys
from cxrd.cli.doctor.firewall import check_firewall
from cxrd.config import Config, ProxyConfig
rules, proxy_port, apply_fix = json.loads(sys.argv[1])
if rules:
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
config = Config(proxy=ProxyConfig(port=proxy_port))
checks = [check_firewall(config)]
if apply_fix:
    fix = checks[0].fix.split("  (")[0].replace("sudo ", "")
    subprocess.run(["sh", "-c", fix], check=True)
    checks.append(check_firewall(config))
print(json.dumps([dataclasses.asdict(check) for check in checks]))
"""


def fake_tool(bin_dir: Path, name: str, answers: dict[str, tuple[int, str]]) -> None:
    """An executable that answers each exact argument list with (exit status, output)."""
    lines = ["#!/bin/sh", 'case "$*" in']
    for args, (rc, out) in answers.items():
        stream = "" if rc == 0 else " >&2"
        lines.append(
            f"  {shlex.quote(args)}) printf '%s\\n' {shlex.quote(out)}{stream}; exit {rc};;"
        )
    lines += [f'  *) echo "fake {name}: unexpected $*" >&2; exit 64;;', "esac"]
    path = bin_dir / name
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """PATH for the check: firewalld not running and ufw inactive, unless a test says otherwise."""
    path = tmp_path / "bin"
    path.mkdir()
    fake_tool(path, "firewall-cmd", {"--state": (252, "not running")})
    fake_tool(path, "ufw", {"status verbose": (0, "Status: inactive")})
    return path


def check(
    bin_dir: Path,
    rules: str = "",
    *,
    proxy_port: int = 48322,
    apply_fix: bool = False,
    wrapper: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    argv = ["unshare", "--net", "--", *wrapper, sys.executable, "-c", CHECK_IN_NETNS]
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"}  # fakes first
    done = subprocess.run(
        [*argv, json.dumps([rules, proxy_port, apply_fix])],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        check=True,
    )
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


DROP_POLICY = """
table inet filter {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    iif lo accept
    tcp dport 22 accept
  }
}
"""


def test_an_empty_ruleset_blocks_nothing(bin_dir: Path) -> None:
    [found] = check(bin_dir)
    assert found["level"] == "ok"
    assert SHIPPED in found["message"]


def test_a_drop_policy_fails_and_its_printed_nft_command_opens_the_ports(bin_dir: Path) -> None:
    found, after = check(bin_dir, DROP_POLICY, apply_fix=True)
    assert found["level"] == "fail"
    assert found["message"].startswith(f"nftables chain inet filter input drops {SHIPPED}")
    assert found["fix"].startswith(
        "sudo nft 'insert rule inet filter input tcp dport { 48322, 49100 } accept'"
        " && sudo nft 'insert rule inet filter input udp dport 47998 accept'"
    )
    assert after["level"] == "ok", after


def test_one_drop_rule_blocks_only_its_port_and_one_accept_opens_only_its_own(
    bin_dir: Path,
) -> None:
    rules = """
table ip fw {
  chain input {
    type filter hook input priority 0; policy accept;
    tcp dport 49100 reject with tcp reset
  }
}
table inet filter {
  chain input {
    type filter hook input priority 0; policy drop;
    tcp dport 48322 accept
    meta l4proto tcp accept
  }
}
"""
    [found] = check(bin_dir, rules)
    assert found["level"] == "fail"
    assert "ip fw input drops 49100/tcp" in found["message"]
    assert "inet filter input drops 47998/udp" in found["message"]
    assert "48322" not in found["message"]


def test_drops_in_jumped_chains_and_accepts_in_verdict_maps_are_followed(bin_dir: Path) -> None:
    rules = """
table inet filter {
  chain headsets { udp dport 47998 accept; tcp dport 49100 drop; }
  chain input {
    type filter hook input priority 0; policy drop;
    tcp dport vmap { 48322 : accept, 22 : accept }
    jump headsets
    tcp dport 49100 accept
  }
}
"""
    [found] = check(bin_dir, rules)
    assert found["level"] == "fail"
    assert found["message"].startswith("nftables chain inet filter input drops 49100/tcp:")


def test_a_rule_that_depends_on_the_source_is_read_in_the_headsets_favour(bin_dir: Path) -> None:
    rules = """
table inet filter {
  chain input {
    type filter hook input priority 0; policy drop;
    ip saddr 10.0.0.0/8 drop
    ip saddr 192.168.0.0/16 accept
  }
}
"""
    [found] = check(bin_dir, rules)
    assert found["level"] == "ok", found


def test_a_custom_proxy_port_is_the_one_checked(bin_dir: Path) -> None:
    rules = DROP_POLICY.replace("tcp dport 22 accept", "tcp dport { 49100, 48322 } accept")
    [found] = check(bin_dir, rules, proxy_port=40000)
    assert found["message"].startswith(
        "nftables chain inet filter input drops 40000/tcp, 47998/udp"
    )


def test_without_capabilities_nft_cannot_tell_and_says_how_to_look(bin_dir: Path) -> None:
    no_caps = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")
    [found] = check(bin_dir, wrapper=no_caps)
    assert found["level"] == "warn"
    assert "cannot tell" in found["message"]
    assert found["fix"] == "look: sudo nft list ruleset"


UFW_ACTIVE = """Status: active
Logging: on (low)
Default: deny (incoming), allow (outgoing), disabled (routed)
New profiles: skip

To                         Action      From
--                         ------      ----
22/tcp                     ALLOW IN    Anywhere
{extra}22/tcp (v6)                ALLOW IN    Anywhere (v6)
"""
UFW_PROFILE = """Profile: CloudXR
Title: NVIDIA CloudXR (cxrd)
Description: WSS proxy with the web client (48322/tcp), runtime signaling
(49100/tcp), media (47998/udp)

Ports:
  48322,49100/tcp
  47998/udp"""


def fake_ufw(bin_dir: Path, extra: str = "") -> None:
    fake_tool(
        bin_dir,
        "ufw",
        {
            "status verbose": (0, UFW_ACTIVE.format(extra=extra)),
            "app info CloudXR": (0, UFW_PROFILE),
        },
    )


def test_active_ufw_without_the_profile_fails_with_ufw_allow_cloudxr(bin_dir: Path) -> None:
    fake_ufw(bin_dir)
    [found] = check(bin_dir)
    assert (found["level"], found["fix"]) == ("fail", "sudo ufw allow CloudXR")
    assert found["message"].startswith(f"ufw blocks {SHIPPED}")


def test_ufw_with_the_profile_allowed_is_ok_and_a_custom_port_gets_its_own_rule(
    bin_dir: Path,
) -> None:
    fake_ufw(bin_dir, "CloudXR                    ALLOW IN    Anywhere\n")
    [found] = check(bin_dir)
    assert (found["level"], found["message"]) == ("ok", f"ufw is active and allows {SHIPPED}")
    [custom] = check(bin_dir, proxy_port=40000)
    assert (custom["level"], custom["fix"]) == ("fail", "sudo ufw allow 40000/tcp")


def test_ufw_without_root_cannot_tell(bin_dir: Path) -> None:
    root_only = (1, "ERROR: You need to be root to run this script")
    fake_tool(bin_dir, "ufw", {"status verbose": root_only, "app info CloudXR": root_only})
    [found] = check(bin_dir, DROP_POLICY)  # nft would fail it: ufw's answer comes first
    assert found["level"] == "warn"
    assert found["message"].startswith("ufw is installed but `ufw status` needs root: cannot tell")
    assert found["fix"].startswith("look: sudo ufw status verbose; open them: sudo ufw allow 48322")


# `firewall-cmd --list-all`; the real one leaves a space after an empty field's colon.
FIREWALLD_ZONE = "\n".join(
    [
        "public (active)",
        "  target: default",
        "  icmp-block-inversion: no",
        "  interfaces: eth0",
        "  sources: ",
        "  services: dhcpv6-client ssh{services}",
        "  ports: {ports}",
        "  protocols: ",
        "  forward: yes",
        "  masquerade: no",
        *(
            f"  {field}: "
            for field in ("forward-ports", "source-ports", "icmp-blocks", "rich rules")
        ),
    ]
)


def service_info(name: str, ports: str) -> tuple[int, str]:
    fields = ("protocols", "source-ports", "modules", "destination", "includes", "helpers")
    return 0, "\n".join([name, f"  ports: {ports}", *(f"  {f}: " for f in fields)])


def fake_firewalld(bin_dir: Path, services: str = "", ports: str = "") -> None:
    fake_tool(
        bin_dir,
        "firewall-cmd",
        {
            "--state": (0, "running"),
            "--list-all": (0, FIREWALLD_ZONE.format(services=services, ports=ports)),
            "--info-service=ssh": service_info("ssh", "22/tcp"),
            "--info-service=dhcpv6-client": service_info("dhcpv6-client", "546/udp"),
            "--info-service=cloudxr": service_info("cloudxr", "48322/tcp 49100/tcp 47998/udp"),
        },
    )


def test_firewalld_zone_without_the_service_fails_with_add_service(bin_dir: Path) -> None:
    fake_firewalld(bin_dir)
    [found] = check(bin_dir, DROP_POLICY)  # firewalld owns the ruleset: its zone is what counts
    assert found["level"] == "fail"
    assert found["message"].startswith(f"firewalld's zone public blocks {SHIPPED}")
    assert found["fix"] == (
        "sudo firewall-cmd --permanent --add-service=cloudxr && sudo firewall-cmd --reload"
    )


def test_firewalld_with_the_service_or_the_ports_is_ok(bin_dir: Path) -> None:
    fake_firewalld(bin_dir, services=" cloudxr")
    [found] = check(bin_dir)
    assert (found["level"], found["message"]) == ("ok", f"firewalld's zone public opens {SHIPPED}")
    fake_firewalld(bin_dir, ports="40000-40010/tcp 49100/tcp 47998/udp")
    [ports] = check(bin_dir, proxy_port=40005)
    assert ports["level"] == "ok", ports


def test_firewalld_with_a_custom_port_closed_gets_add_port(bin_dir: Path) -> None:
    fake_firewalld(bin_dir, services=" cloudxr")
    [found] = check(bin_dir, proxy_port=40000)
    assert found["fix"] == (
        "sudo firewall-cmd --permanent --add-port=40000/tcp && sudo firewall-cmd --reload"
    )
