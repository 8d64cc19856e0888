"""What the supervisor needs to run the proxy: a checked certificate, a held socket, a spec.

The daemon binds the proxy's port itself (a taken port is a start error with
the holder named, before any child runs) and keeps the listening socket for
its whole life: each proxy process inherits it with ``--listen-fd``, so a
proxy restart loses no port and clients queue in the kernel meanwhile. The
proxy reports that it serves by writing ``READY`` to the pipe the supervisor
passes to :meth:`ProxyLaunch.spec`.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cxrd import constants as C
from cxrd.config import Config, LogsConfig, ProxyConfig
from cxrd.core.model import ChildSpec
from cxrd.proxy.certs import ensure_certificate, expires_soon, validate_pair
from cxrd.system.addresses import headset_urls
from cxrd.system.listeners import bind_listener
from cxrd.system.logfiles import ensure_logs_dir

PROXY_STDERR_LOG = "wss.stderr.log"  # the proxy's own tracebacks, if any; wss.log is its log
BACKEND_HOST = "127.0.0.1"


@dataclass
class ProxyLaunch:
    listener: socket.socket  # bound and listening; held by the daemon for its life
    urls: tuple[str, ...]  # the client URLs a person opens on a headset, first one first
    port: int
    log_path: Path  # <install>/logs/wss.log, appended
    cert: Path
    key: Path
    settings: ProxyConfig = field(default_factory=ProxyConfig)
    backend_port: int = C.DEFAULT_BACKEND_PORT  # runtime.signaling_port
    client_dir: Path | None = None  # None: the web client is not hosted
    log_limits: LogsConfig = field(default_factory=LogsConfig)
    cert_note: str = ""  # renewed at this start, or a user's pair near its end

    @property
    def url(self) -> str:
        return self.urls[0] if self.urls else ""

    @property
    def stderr_log(self) -> Path:
        return self.log_path.with_name(PROXY_STDERR_LOG)

    def spec(self, ready_fd: int) -> ChildSpec:
        """The proxy child: inherits the listener and ``ready_fd``, writes READY to it."""
        fd = self.listener.fileno()
        s = self.settings
        argv = (
            sys.executable,
            "-m",
            "cxrd.proxy",
            "--listen-fd",
            str(fd),
            "--ready-fd",
            str(ready_fd),
            "--parent-pid",
            str(os.getpid()),
            "--backend-host",
            BACKEND_HOST,
            "--backend-port",
            str(self.backend_port),
            "--cert",
            str(self.cert),
            "--key",
            str(self.key),
            "--log",
            str(self.log_path),
            "--log-max-bytes",
            str(self.log_limits.max_bytes),
            "--log-keep",
            str(self.log_limits.keep),
            "--max-message-size",
            str(s.max_message_size),
            "--max-connections",
            str(s.max_connections),
            "--max-pending",
            str(s.max_pending),
            "--max-per-address",
            str(s.max_per_address),
            "--handshake-timeout",
            repr(s.handshake_timeout),
            "--head-timeout",
            repr(s.head_timeout),
            "--send-timeout",
            repr(s.send_timeout),
            "--ping-interval",
            repr(s.ping_interval),
            "--ping-timeout",
            repr(s.ping_timeout),
            *(("--client-dir", str(self.client_dir)) if self.client_dir is not None else ()),
            *(arg for entry in s.allow for arg in ("--allow", entry)),
            *(arg for entry in s.origins for arg in ("--origin", entry)),
        )
        return ChildSpec(
            name="proxy",
            argv=argv,
            env=dict(os.environ),
            stderr=self.stderr_log,
            pass_fds=(fd, ready_fd),
            stderr_limits=self.log_limits,
        )

    def close(self) -> None:
        """Release the port (the daemon is stopping, or the proxy's settings changed)."""
        self.listener.close()


def prepare_proxy(config: Config, keep: ProxyLaunch | None = None) -> ProxyLaunch:
    """Check or make the certificate, then bind the port; StartFailed names what is wrong.

    ``keep``'s listener is reused when the host and port are the same, so a
    reload of other proxy settings loses no queued client. Blocking (key
    generation, name lookups): call it off the event loop.
    """
    settings = config.proxy
    if settings.cert is not None and settings.key is not None:
        cert = Path(settings.cert).expanduser().absolute()
        key = Path(settings.key).expanduser().absolute()
        info = validate_pair(cert, key)
        note = ""
        if expires_soon(cert):
            note = f"{cert} expires on {info.not_after:%Y-%m-%d}: renew it (yours; cxrd never will)"
    else:
        renewing = expires_soon(config.certs_dir / C.CERT_FILE)
        cert, key = ensure_certificate(config.certs_dir)
        note = (
            f"renewed on {dt.date.today():%Y-%m-%d}: each headset must accept it again "
            "(open the certificate page, `cxrctl url`)"
            if renewing
            else ""
        )
    logs = config.logs_dir
    ensure_logs_dir(logs)  # InvalidConfig naming it: a link, another user's, or unmakeable
    same_address = keep is not None and (keep.settings.host, keep.settings.port) == (
        settings.host,
        settings.port,
    )
    if keep is not None and same_address:
        listener = keep.listener
    else:
        listener = bind_listener(settings.host, settings.port)
    port = int(listener.getsockname()[1])
    return ProxyLaunch(
        listener=listener,
        urls=tuple(u.client for u in headset_urls(settings.host, port)),
        port=port,
        log_path=logs / C.PROXY_LOG,
        cert=cert,
        key=key,
        settings=settings,
        backend_port=config.runtime.signaling_port,
        client_dir=config.client_path if settings.host_client else None,
        log_limits=config.logs,
        cert_note=note,
    )
