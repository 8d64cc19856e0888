"""Put the CloudXR web client into the client directory (``cxrctl client fetch``).

The default source and the file list are isaacteleop's: the build published
for the installed ``isaacteleop`` version under
``https://nvidia.github.io/IsaacCapture/client/v<version>/``, files
``index.html`` and ``bundle.js`` (required) and ``bundle.emulator.js``
(optional). Everything is fetched into a fresh directory beside the target,
then swapped in with renames, so a failed fetch leaves the old client as it
was. The daemon never calls this; only a person does.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urljoin

from cxrd.errors import CxrdError

PUBLISHED = "https://nvidia.github.io/IsaacCapture/client/"
REQUIRED = ("index.html", "bundle.js")
OPTIONAL = ("bundle.emulator.js",)
MAX_FILE = 32 * 1024 * 1024  # per file, as isaacteleop caps them
CHUNK = 64 * 1024
TIMEOUT = 30.0

Progress = Callable[[str, int, int | None], None]  # file name, bytes so far, total if known


class FetchFailed(CxrdError):
    """The web client could not be fetched; the old one, if any, is untouched."""


def default_source() -> str:
    """The build matching the installed runtime package, as isaacteleop picks it."""
    try:
        v = version("isaacteleop").strip()
    except PackageNotFoundError:
        return urljoin(PUBLISHED, "main/")
    if re.fullmatch(r"\d+\.\d+\.\d+", v):
        return urljoin(PUBLISHED, f"v{v}/")
    if m := re.match(r"(\d+)\.(\d+)", v):
        return urljoin(PUBLISHED, f"release-{m[1]}.{m[2]}.x/")
    return PUBLISHED


def fetch(target: Path, source: str, *, force: bool, progress: Progress | None = None) -> Path:
    """Fetch the client from ``source`` (a base URL or a directory) into ``target``."""
    if (target / "index.html").is_file() and not force:
        raise FetchFailed(f"{target} already holds a web client; --force replaces it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name in (*REQUIRED, *OPTIONAL):
            got = _copy(source, name, staging / name, progress)
            if not got and name in REQUIRED:
                raise FetchFailed(f"{_where(source, name)}: not found")
        staging.chmod(0o755)
        _swap(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _where(source: str, name: str) -> str:
    return (
        urljoin(source if source.endswith("/") else source + "/", name)
        if _is_url(source)
        else (str(Path(source) / name))
    )


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _copy(source: str, name: str, dest: Path, progress: Progress | None) -> bool:
    """One file into ``dest``; False when the source has no such file."""
    where = _where(source, name)
    if not _is_url(source):
        path = Path(where)
        if not path.is_file():
            return False
        if path.stat().st_size > MAX_FILE:
            raise FetchFailed(f"{path}: larger than {MAX_FILE} bytes")
        shutil.copyfile(path, dest)
        return True
    request = urllib.request.Request(where, headers={"User-Agent": "cxrd"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as reply, dest.open("wb") as out:
            length = reply.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > MAX_FILE:
                raise FetchFailed(f"{where}: {total} bytes, more than {MAX_FILE}")
            done = 0
            while chunk := reply.read(CHUNK):
                done += len(chunk)
                if done > MAX_FILE:
                    raise FetchFailed(f"{where}: more than {MAX_FILE} bytes")
                out.write(chunk)
                if progress is not None:
                    progress(name, done, total)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise FetchFailed(f"{where}: the server answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise FetchFailed(
            f"cannot download {where}: {why}; offline? copy the client from another "
            "machine and use `cxrctl client fetch --from DIR`"
        ) from None
    if done == 0:
        raise FetchFailed(f"{where}: empty")
    return True


def _swap(staging: Path, target: Path) -> None:
    """``staging`` becomes ``target``; the old ``target`` is removed only once that holds."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    had_old = target.exists()
    if had_old:
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        if had_old:
            old.rename(target)
        raise
    with contextlib.suppress(OSError):
        shutil.rmtree(old)
