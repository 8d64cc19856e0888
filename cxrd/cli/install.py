"""``cxrctl install`` / ``cxrctl uninstall``: the units, the D-Bus activation files, completions.

``install()`` writes ``cloudxr.service``, the template ``cloudxr@.service``
(named instances) and ``io.github.cxrd.Daemon1.service``, plus one
``io.github.cxrd.Daemon1.NAME.service`` per named instance asked for (its bus
name activates ``cloudxr@NAME.service``), from the templates in ``cxrd/data``
with ``ExecStart=``/``Exec=`` pointing at
the cxrd of the interpreter running this code (``<python> -m cxrd``), so pip,
venv and conda installs each get a unit that runs their own copy, and the
bash, zsh and fish completions of ``cxrctl`` and ``cxrd``. It records
what it wrote (path and SHA-256) in a manifest, and ``uninstall()`` removes
exactly those files, and only while they still hold what was written.

Both then ask the user's systemd to reload its units and the session bus to
reload its service files; either being unreachable (no login session, a
container) is not an error, and the returned list's ``notes`` say so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dbus_fast import Message, MessageType

from cxrd import constants as C
from cxrd.cli import completions
from cxrd.dbus.connection import CONNECT_ERRORS, connect, session_bus_address
from cxrd.errors import CxrdError
from cxrd.instances import Instance

MANIFEST_NAME = "install-manifest.json"
_RELOAD_TIMEOUT = 10.0
# A word both systemd and dbus-daemon take as is, unquoted.
_PLAIN_WORD = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


class InstallConflict(CxrdError):
    """A file cxrd would write exists and was not written by cxrd (or was edited since)."""

    name = "InstallConflict"
    exit_code = 1
    hint = "move the file away, or pass --force to overwrite it"


class Installed(list[Path]):
    """The paths written or removed, plus what a person should know about reloading."""

    def __init__(self, paths: Iterable[Path] = (), notes: Iterable[str] = ()) -> None:
        super().__init__(paths)
        self.notes: list[str] = list(notes)


@dataclass(frozen=True)
class Layout:
    """Where the units, the activation files and the manifest go for one install mode."""

    unit: Path
    activation: Path
    manifest: Path
    user: bool
    # shell -> where its completion files go: bash-completion's completions/
    # (loaded on first use), a zsh fpath dir, fish's autoloaded dir.
    completions: dict[str, Path]

    @property
    def template_unit(self) -> Path:
        return self.unit.with_name(C.UNIT_TEMPLATE)

    def activation_for(self, instance: Instance) -> Path:
        return self.activation.with_name(instance.activation_file)

    @classmethod
    def for_prefix(cls, system_prefix: Path | None) -> Layout:
        if system_prefix is None:
            config = _xdg("XDG_CONFIG_HOME", "~/.config")
            data = _xdg("XDG_DATA_HOME", "~/.local/share")
            bash = os.environ.get("BASH_COMPLETION_USER_DIR", "").split(":")[0]
            return cls(
                unit=config / "systemd" / "user" / C.UNIT_NAME,
                activation=data / "dbus-1" / "services" / C.DBUS_SERVICE_FILE,
                manifest=data / "cxrd" / MANIFEST_NAME,
                user=True,
                completions={
                    "bash": (Path(bash) if os.path.isabs(bash) else data / "bash-completion")
                    / "completions",
                    # zsh has no per-user default: install notes the fpath line.
                    "zsh": data / "zsh" / "site-functions",
                    "fish": config / "fish" / "completions",
                },
            )
        prefix = Path(system_prefix).absolute()
        share = prefix / "share"
        return cls(
            unit=prefix / "lib" / "systemd" / "user" / C.UNIT_NAME,
            activation=share / "dbus-1" / "services" / C.DBUS_SERVICE_FILE,
            manifest=share / "cxrd" / MANIFEST_NAME,
            user=False,
            completions={
                "bash": share / "bash-completion" / "completions",
                "zsh": share / "zsh" / "vendor-completions",
                "fish": share / "fish" / "vendor_completions.d",
            },
        )


def _xdg(name: str, default: str) -> Path:
    value = os.environ.get(name)
    # The XDG spec: a relative value is invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return Path(os.path.expanduser(default))


def default_exec_argv() -> list[str]:
    """The command line that runs cxrd with this interpreter (venv/conda/pip alike)."""
    return [sys.executable, "-m", "cxrd"]


def template(name: str) -> str:
    """The packaged text of ``cloudxr.service`` or the activation file."""
    return (resources.files("cxrd") / "data" / name).read_text(encoding="utf-8")


def systemd_quote(argv: Sequence[str]) -> str:
    """One ``ExecStart=`` value: quoted where needed, ``%`` and ``$`` escaped."""
    words = []
    for index, arg in enumerate(argv):
        escaped = arg.replace("%", "%%")
        if index > 0:
            # systemd expands $VAR in arguments; the executable's path is taken as is.
            escaped = escaped.replace("$", "$$")
        if not _PLAIN_WORD.match(escaped):
            escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
        words.append(escaped)
    return " ".join(words)


def dbus_quote(argv: Sequence[str]) -> str:
    """One ``Exec=`` value for dbus-daemon, whose parser follows the shell's quoting."""
    words = []
    for arg in argv:
        if _PLAIN_WORD.match(arg):
            words.append(arg)
        else:
            words.append("'" + arg.replace("'", "'\\''") + "'")
    return " ".join(words)


# The unit's daemon requires its session bus: a user session without one is an
# error to see, not a daemon that nobody can reach (``cxrd --bus``).
UNIT_ARGS = ("--bus", "session")


def render_unit(argv: Sequence[str]) -> str:
    return _replace_key(template(C.UNIT_NAME), "ExecStart", systemd_quote([*argv, *UNIT_ARGS]))


def render_template_unit(argv: Sequence[str]) -> str:
    """``cloudxr@.service``: ``%i``, the instance name, becomes ``--instance``."""
    exec_start = f"{systemd_quote([*argv, *UNIT_ARGS])} --instance %i"
    return _replace_key(template(C.UNIT_TEMPLATE), "ExecStart", exec_start)


def render_activation(argv: Sequence[str], instance: Instance | None = None) -> str:
    """The activation file of ``instance`` (None: the unnamed one)."""
    instance = instance or Instance()
    text = template(C.DBUS_SERVICE_FILE)
    if instance.name:
        # Every bus name and unit name in it, comments included, becomes the instance's.
        text = text.replace(C.BUS_NAME, instance.bus_name).replace(C.UNIT_NAME, instance.unit)
    return _replace_key(text, "Exec", dbus_quote([*argv, *instance.daemon_args]))


def _replace_key(text: str, key: str, value: str) -> str:
    pattern = re.compile(rf"^{key}=.*$", re.MULTILINE)
    if len(pattern.findall(text)) != 1:
        raise RuntimeError(f"packaged template must hold exactly one {key}= line")
    return pattern.sub(lambda _m: f"{key}={value}", text)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InstallConflict(f"{path}: unreadable install manifest: {exc}") from None
    files = raw.get("files", {}) if isinstance(raw, dict) else {}
    if not isinstance(files, dict):
        return {}
    return {str(k): str(v) for k, v in files.items()}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.cxrd-tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def install(
    system_prefix: Path | None = None,
    *,
    instances: Sequence[Instance] = (),
    exec_argv: Sequence[str] | None = None,
    force: bool = False,
    reload: bool = True,
) -> Installed:
    """Write the units, the activation files and the shell completions; return the paths written.

    ``system_prefix`` None installs for this user (XDG dirs); ``/usr`` or
    ``/usr/local`` installs for every user of the machine. ``instances``: named
    instances to write activation files for; those of earlier installs stay.
    A file already there is replaced only when cxrd wrote it (manifest) or it
    is identical, unless ``force``.
    """
    layout = Layout.for_prefix(system_prefix)
    argv = list(exec_argv) if exec_argv is not None else default_exec_argv()
    wanted = {
        layout.unit: render_unit(argv).encode(),
        layout.template_unit: render_template_unit(argv).encode(),
        layout.activation: render_activation(argv).encode(),
        **completions.files(layout.completions),
    }
    for instance in instances:
        if instance.name:
            wanted[layout.activation_for(instance)] = render_activation(argv, instance).encode()
    recorded = _read_manifest(layout.manifest)
    for path, data in wanted.items():
        _check_replaceable(path, data, recorded, force)
    for path, data in wanted.items():
        _write_atomic(path, data)
    # Files of earlier installs (other instances' activation files) stay recorded.
    files = {name: digest for name, digest in recorded.items() if Path(name).exists()}
    files.update({str(path): _digest(data) for path, data in wanted.items()})
    manifest = {"version": 1, "exec": argv, "files": files}
    _write_atomic(layout.manifest, (json.dumps(manifest, indent=2) + "\n").encode())
    notes = reload_managers() if reload else []
    zsh = layout.completions["zsh"]
    if layout.user and Path(os.environ.get("SHELL", "")).name == "zsh":  # a zsh user
        notes.append(f"zsh completions: add fpath+=({zsh}) to ~/.zshrc before compinit")
    return Installed([*wanted, layout.manifest], notes)


def _check_replaceable(path: Path, data: bytes, recorded: dict[str, str], force: bool) -> None:
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        return
    if force or current == data or recorded.get(str(path)) == _digest(current):
        return
    raise InstallConflict(f"{path} exists and was not written by `cxrctl install`")


def uninstall(
    system_prefix: Path | None = None, *, instance: Instance | None = None, reload: bool = True
) -> Installed:
    """Remove what ``install()`` wrote and still holds its content; return the paths removed.

    A recorded file that was edited since is left in place, with a note. A
    named ``instance``: only its activation file goes, the rest stays.
    """
    layout = Layout.for_prefix(system_prefix)
    recorded = _read_manifest(layout.manifest)
    if instance is not None and instance.name:
        return _uninstall_instance(layout, recorded, instance, reload)
    removed: list[Path] = []
    notes: list[str] = []
    for name, digest in recorded.items():
        path = Path(name)
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            continue
        if _digest(current) != digest:
            notes.append(f"left {path} in place: it was changed after `cxrctl install`")
            continue
        path.unlink()
        removed.append(path)
    if layout.manifest.exists():
        layout.manifest.unlink()
        removed.append(layout.manifest)
    with contextlib.suppress(OSError):
        layout.manifest.parent.rmdir()  # cxrd's own dir, only when empty
    if layout.user:
        wants = layout.unit.parent / "default.target.wants" / C.UNIT_NAME
        if wants.is_symlink() and not wants.exists():
            notes.append(f"{wants} is left dangling; `systemctl --user disable cloudxr` removes it")
    if reload and removed:
        notes.extend(reload_managers())
    return Installed(removed, notes)


def _uninstall_instance(
    layout: Layout, recorded: dict[str, str], instance: Instance, reload: bool
) -> Installed:
    path = layout.activation_for(instance)
    digest = recorded.pop(str(path), None)
    if digest is None:
        return Installed()
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        current = None
    if current is not None and _digest(current) != digest:
        return Installed(notes=[f"left {path} in place: it was changed after `cxrctl install`"])
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    raw = json.loads(layout.manifest.read_text(encoding="utf-8"))
    raw["files"] = recorded
    _write_atomic(layout.manifest, (json.dumps(raw, indent=2) + "\n").encode())
    return Installed([path], reload_managers() if reload else [])


def reload_managers() -> list[str]:
    """``daemon-reload`` the user manager and ``ReloadConfig`` the session bus.

    Returns notes for the ones that could not be reached; none is an error.
    """
    notes = []
    systemd_note = _systemd_daemon_reload()
    if systemd_note:
        notes.append(systemd_note)
    bus_note = _bus_reload_config()
    if bus_note:
        notes.append(bus_note)
    return notes


def _systemd_daemon_reload() -> str | None:
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return "systemctl not found: the unit takes effect once a user manager runs"
    try:
        result = subprocess.run(
            [systemctl, "--user", "daemon-reload"],
            capture_output=True,
            text=True,
            timeout=_RELOAD_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return "systemctl --user daemon-reload timed out; run it again later"
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no reason given"])[-1]
        return (
            f"user manager not reached ({reason}); "
            "run `systemctl --user daemon-reload` in your login session"
        )
    return None


def _bus_reload_config() -> str | None:
    address = session_bus_address()
    if address is None:
        return "no session bus: the activation file takes effect when one starts"
    # A fresh loop in a worker thread: safe even when the caller runs an event loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(asyncio.run, _call_reload_config(address))
        try:
            return future.result(timeout=_RELOAD_TIMEOUT + 1)
        except concurrent.futures.TimeoutError:
            return "the session bus did not answer ReloadConfig in time"


async def _call_reload_config(address: str) -> str | None:
    try:
        async with asyncio.timeout(_RELOAD_TIMEOUT):
            bus = await connect(address, timeout=_RELOAD_TIMEOUT)
            try:
                reply = await bus.call(
                    Message(
                        destination=C.DBUS,
                        path=C.DBUS_PATH,
                        interface=C.DBUS,
                        member="ReloadConfig",
                    )
                )
            finally:
                bus.disconnect()
    except CONNECT_ERRORS as exc:
        return f"session bus not reached ({exc}); it rereads service files on its next start"
    if reply is None or reply.message_type == MessageType.ERROR:
        detail = reply.error_name if reply is not None else "no reply"
        return f"session bus refused ReloadConfig ({detail})"
    return None
