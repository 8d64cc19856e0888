"""The addresses a headset can reach this host at, and the URLs a person types.

Headset browsers rarely resolve a bare hostname, so the URLs use each
non-loopback IPv4 address of the host, plus ``<hostname>.local`` where mDNS
resolves it. ``cxrctl url``, the daemon's ``HeadsetUrls``, the certificate's
SANs and doctor all read this one list.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlencode

import psutil

MDNS_LOOKUP_TIMEOUT = 1.0  # a resolver without mDNS may ask DNS for .local and wait


@dataclass(frozen=True)
class HeadsetUrl:
    host: str  # an IPv4 address or a .local name
    cert_page: str  # https://<host>:<port>/ : where a headset accepts the certificate
    client: str  # https://<host>:<port>/client/?serverIP=<host>&port=<port>


def _up_addresses(family: socket.AddressFamily) -> list[str]:
    """Addresses of ``family`` on interfaces that are up, each once, in interface order."""
    stats = psutil.net_if_stats()
    found: list[str] = []
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for addr in addrs:
            if addr.family == family and addr.address not in found:
                found.append(addr.address)
    return found


def ipv4_addresses() -> list[str]:
    """Each non-loopback, non-link-local IPv4 address of an interface that is up."""
    ips = (ipaddress.IPv4Address(a) for a in _up_addresses(socket.AF_INET))
    return [str(ip) for ip in ips if not (ip.is_loopback or ip.is_link_local)]


def global_ipv6_addresses() -> list[str]:
    """Each global-scope IPv6 address of an interface that is up."""
    found: list[str] = []
    for text in _up_addresses(socket.AF_INET6):
        ip = ipaddress.IPv6Address(text.split("%", 1)[0])
        if ip.is_global and str(ip) not in found:
            found.append(str(ip))
    return found


def mdns_name() -> str | None:
    """``<hostname>.local`` when it resolves (nss-mdns and avahi), else None."""
    name = socket.gethostname().split(".")[0]
    if not name:
        return None
    local = f"{name}.local"
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    lookup = pool.submit(socket.getaddrinfo, local, None, socket.AF_INET)
    pool.shutdown(wait=False)
    try:
        lookup.result(timeout=MDNS_LOOKUP_TIMEOUT)
    except (OSError, concurrent.futures.TimeoutError):
        return None
    return local


def headset_hosts(bind_host: str) -> list[str]:
    """What a headset types for a proxy bound to ``bind_host``."""
    if bind_host not in ("", "0.0.0.0", "::"):
        return [bind_host]
    hosts = ipv4_addresses() or ["127.0.0.1"]
    local = mdns_name()
    return [*hosts, local] if local else hosts


def headset_url(host: str, port: int) -> HeadsetUrl:
    shown = f"[{host}]" if ":" in host else host
    base = f"https://{shown}:{port}/"
    query = urlencode({"serverIP": host, "port": port})
    return HeadsetUrl(host=host, cert_page=base, client=f"{base}client/?{query}")


def headset_urls(bind_host: str, port: int) -> list[HeadsetUrl]:
    return [headset_url(host, port) for host in headset_hosts(bind_host)]
