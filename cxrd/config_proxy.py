"""The ``[proxy]`` table of cxrd.toml: its schema and its checks. Pure.

:mod:`cxrd.config` builds the whole config and calls :func:`checked_proxy`;
the proxy process reads ``--allow`` with :func:`allow_network`, so an entry
means the same in the file and on the command line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from cxrd import constants as C
from cxrd.errors import InvalidConfig

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # IPv4-mapped IPv6 addresses (RFC 4291)


@dataclass(frozen=True)
class ProxyConfig:
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = C.DEFAULT_PROXY_PORT
    # Deprecated alias of runtime.signaling_port; load_config folds it in and clears it.
    backend_port: int | None = None
    cert: str | None = None
    key: str | None = None
    max_message_size: int = 4 * 1024 * 1024
    max_connections: int = 64  # WebSocket sessions relayed at once (more: 503)
    # Admission, checked at accept() before any TLS byte (cxrd.proxy.admission):
    max_pending: int = 64  # connections not (yet) a session: TLS handshake, request head, answer
    max_per_address: int = 16  # connections from one address, sessions included
    handshake_timeout: float = 5.0  # accept to TLS handshake done
    head_timeout: float = 5.0  # TLS handshake done to the whole request head
    send_timeout: float = 10.0  # an HTTP answer the client takes none of for this long: dropped
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    host_client: bool = True  # serve the web client at /client/
    client_dir: str | None = None  # None: $TELEOP_WEB_CLIENT_STATIC_DIR, else <install>/...
    allow: tuple[str, ...] = ()  # addresses and CIDR networks that may connect; () = everyone
    # Web pages (origins) that may open a WebSocket or read /healthz, besides the proxy's
    # own pages and isaacteleop's published client; "*" allows any page.
    origins: tuple[str, ...] = ()


def allow_network(text: str) -> Network:
    """One ``proxy.allow`` entry as a network; ValueError saying why it is refused.

    An IPv4-mapped IPv6 entry (``::ffff:10.0.0.7``, ``::ffff:10.0.0.0/120``)
    means its IPv4 address or network: the proxy matches a mapped peer (a
    dual-stack listener's IPv4 client) as IPv4, so the mapped form as written
    would never match anyone.
    """
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an address or a CIDR network") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


ANY_ORIGIN = "*"
_DEFAULT_PORTS = {"https": 443, "http": 80}


def origin_entry(text: str) -> str:
    """One ``proxy.origins`` entry as browsers send it in ``Origin``; ValueError saying why not.

    ``scheme://host[:port]``: lowercase, the scheme's default port left out,
    no path (an origin has none; a pasted page URL is refused, naming its
    origin). ``"*"`` stays as it is.
    """
    if text == ANY_ORIGIN:
        return text
    origin = normal_origin(text)
    if origin is not None:
        return origin
    netloc = text.split("://", 1)[1].split("/", 1)[0] if "://" in text else ""
    base = normal_origin(text.split("://", 1)[0] + "://" + netloc) if netloc else None
    if base is not None:
        raise ValueError(f"{text!r} is a page, not an origin (which has no path): {base!r}")
    raise ValueError(f"{text!r} is not an origin (https://host or https://host:port)")


def normal_origin(text: str) -> str | None:
    """``text`` as a browser serialises an origin, or None if it is not one."""
    try:
        split = urlsplit(text)
        port = split.port
    except ValueError:
        return None
    scheme, host = split.scheme.lower(), split.hostname
    if scheme not in _DEFAULT_PORTS or not host or split.username or split.password:
        return None
    if split.path not in ("", "/") or split.query or split.fragment or "%" in host:
        return None
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" + ("" if port in (None, _DEFAULT_PORTS[scheme]) else f":{port}")


def _entry_text(network: Network) -> str:
    return str(network.network_address) if network.num_addresses == 1 else str(network)


def checked_proxy(proxy: ProxyConfig, src: str) -> ProxyConfig:
    """``proxy`` with ``allow`` and ``origins`` normalised; InvalidConfig names a bad key."""
    positive: dict[str, float] = {
        "max_message_size": proxy.max_message_size,
        "max_connections": proxy.max_connections,
        "max_pending": proxy.max_pending,
        "max_per_address": proxy.max_per_address,
        "handshake_timeout": proxy.handshake_timeout,
        "head_timeout": proxy.head_timeout,
        "send_timeout": proxy.send_timeout,
        "ping_interval": proxy.ping_interval,
        "ping_timeout": proxy.ping_timeout,
    }
    for key, value in positive.items():
        if not value > 0:
            raise InvalidConfig(f"{src}: proxy.{key}: must be greater than 0, got {value}")
    if (proxy.cert is None) != (proxy.key is None):
        raise InvalidConfig(f"{src}: proxy.cert, proxy.key: give both or neither")
    allow: list[str] = []
    for entry in proxy.allow:
        try:
            allow.append(_entry_text(allow_network(entry)))
        except ValueError as exc:
            raise InvalidConfig(f"{src}: proxy.allow: {exc}") from None
    origins: list[str] = []
    for entry in proxy.origins:
        try:
            origins.append(origin_entry(entry))
        except ValueError as exc:
            raise InvalidConfig(f"{src}: proxy.origins: {exc}") from None
    return dataclasses.replace(proxy, allow=tuple(allow), origins=tuple(origins))
