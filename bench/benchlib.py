"""What the bench scripts share: free loopback ports and a private ``dbus-daemon``.

Standard library only. A bench script runs as ``python bench/NAME.py``, so this
folder is ``sys.path[0]`` and ``import benchlib`` finds this file;
``tests/test_chaos.py`` puts the folder on ``sys.path`` before it loads
``bench/chaos.py``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# The real CloudXR ports (the proxy's and the runtime's signaling): never handed out.
RESERVED_PORTS = frozenset({48322, 49100})

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def free_port() -> int:
    """A loopback TCP port that was free a moment ago; never one of ``RESERVED_PORTS``."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in RESERVED_PORTS:
            return port


def _read_line(fd: int, timeout: float) -> str:
    """The first line written to ``fd`` within ``timeout`` seconds; "" on EOF or timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:  # the daemon exited
            break
        data += chunk
    return data.partition(b"\n")[0].decode(errors="replace").strip()


@contextlib.contextmanager
def private_bus(workdir: Path, timeout: float = 10.0) -> Iterator[str]:
    """A throwaway ``dbus-daemon``; yields its address and stops it on the way out.

    Its config goes to ``workdir/bus.conf``; its socket to a short temp dir of its
    own (a unix socket path has a length limit that a deep ``workdir`` could pass).
    Waiting for the address and for the exit are each bounded by ``timeout``.
    """
    if shutil.which("dbus-daemon") is None:
        raise SystemExit("dbus-daemon is not installed")
    sock_dir = Path(tempfile.mkdtemp(prefix="cxrd-bench-bus-"))
    try:
        config = workdir / "bus.conf"
        config.write_text(BUS_CONFIG.format(dir=sock_dir))
        proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--print-address", "--nofork"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            address = _read_line(proc.stdout.fileno(), timeout)
            if not address:
                raise SystemExit(f"dbus-daemon printed no address within {timeout:g} s")
            yield address
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
            if proc.stdout is not None:
                proc.stdout.close()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def mentions(pid: int, needle: bytes) -> bool:
    """Whether a live (not zombie) process's cmdline or environ names ``needle``."""
    proc = Path(f"/proc/{pid}")
    try:
        if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return any(needle in proc.joinpath(name).read_bytes() for name in ("cmdline", "environ"))
    except (OSError, IndexError):
        return False


def processes_of(install_dir: Path) -> list[int]:
    needle, me = str(install_dir).encode(), os.getpid()
    return [
        int(e.name)
        for e in Path("/proc").iterdir()
        if e.name.isdigit() and int(e.name) != me and mentions(int(e.name), needle)
    ]


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "(gone)"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
