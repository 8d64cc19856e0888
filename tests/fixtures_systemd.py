"""Fixtures: a real ``systemd --user`` manager, private to one test.

The manager runs with its own 0700 ``XDG_RUNTIME_DIR``, ``HOME``,
``XDG_CONFIG_HOME`` and ``XDG_DATA_HOME`` under a tmp dir, and in a cgroup of
its own (created under the machine's cgroup2 and name=systemd hierarchies), so
its units never meet another manager's and teardown can kill whatever is left
with one write to ``cgroup.kill``. Its session bus (``dbus.socket`` from
dbus-user-session) lives at ``$XDG_RUNTIME_DIR/bus`` and D-Bus-activates units
through this manager.

A manager started in the root cgroup would move every process of the machine
into ``/init.scope``; the private cgroup is what prevents that, so this fixture
needs root (CI runs as root). It also needs ``/run/systemd/system``, the mark
of a systemd-booted machine, which it creates when missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import TIMEOUT, wait_until

SYSTEMD = "/usr/lib/systemd/systemd"


def _cgroup_mounts() -> list[Path]:
    """Mount points of the hierarchies systemd tracks processes in (cgroup2, name=systemd)."""
    found: list[Path] = []
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            _dev, where, kind, options, *_ = line.split()
            if kind == "cgroup2" or (kind == "cgroup" and "name=systemd" in options.split(",")):
                found.append(Path(where.replace("\\040", " ")))
    return found


def _why_no_systemd() -> str | None:
    if not os.path.exists(SYSTEMD):
        return f"{SYSTEMD} is not installed (apt-get install systemd)"
    try:
        os.makedirs("/run/systemd/system", exist_ok=True)
    except OSError as exc:
        return f"cannot create /run/systemd/system ({exc.strerror}); run the tests as root"
    if os.geteuid() != 0:
        return "a private systemd --user needs root to get a cgroup of its own"
    if not any(m for m in _cgroup_mounts() if os.access(m, os.W_OK)):
        return "no writable cgroup hierarchy for a private systemd --user"
    return None


@dataclass
class UserManager:
    """A running ``systemd --user`` and the environment to talk to it."""

    root: Path
    home: Path
    runtime_dir: Path
    config_home: Path
    data_home: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    cgroups: list[Path]
    log_path: Path

    @property
    def bus_address(self) -> str:
        return f"unix:path={self.runtime_dir / 'bus'}"

    @property
    def unit_dir(self) -> Path:
        return self.config_home / "systemd" / "user"

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = TIMEOUT,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as a client of this manager and its bus."""
        env = {**self.env, **(extra_env or {})}
        result = subprocess.run(
            list(argv),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd=self.home,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--user", "--no-pager", *args, check=check, timeout=timeout)

    def busctl(
        self, *args: str, check: bool = True, timeout: float = TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return self.run("busctl", "--user", *args, check=check, timeout=timeout)

    def journal(self, unit: str) -> str | None:
        """The unit's journal, or None where this machine has no journald to ask."""
        if not Path("/run/systemd/journal/socket").exists() or shutil.which("journalctl") is None:
            return None
        result = self.run(
            "journalctl", "--user", "-u", unit, "--no-pager", "-o", "cat", check=False
        )
        return result.stdout if result.returncode == 0 else None

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        values: dict[str, str] = {}
        for line in out.splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return values

    def write_dropin(self, unit: str, name: str, text: str) -> Path:
        path = self.unit_dir / f"{unit}.d" / f"{name}.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def cgroup_pids(self, control_group: str) -> set[int]:
        """Every pid in a unit's cgroup (``ControlGroup=``) and below, read from the kernel."""
        pids: set[int] = set()
        if not control_group.strip("/"):
            return pids  # a unit that is not running has no cgroup (never the root's)
        for mount in self.cgroups[:1]:
            base = mount.parent / control_group.lstrip("/")
            for procs in base.rglob("cgroup.procs") if base.exists() else ():
                with contextlib.suppress(FileNotFoundError):
                    pids.update(int(p) for p in procs.read_text().split())
        return pids

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


def _start_manager(root: Path) -> UserManager:
    home, runtime_dir = root / "home", root / "xdg-runtime"
    config_home, data_home = home / ".config", home / ".local" / "share"
    for path in (home, runtime_dir, config_home, data_home):
        path.mkdir(parents=True, exist_ok=True)
    runtime_dir.chmod(0o700)
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "USER": "root",
        "LOGNAME": "root",
        "LANG": "C.UTF-8",
        "XDG_RUNTIME_DIR": str(runtime_dir),
        "XDG_CONFIG_HOME": str(config_home),
        "XDG_DATA_HOME": str(data_home),
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={runtime_dir / 'bus'}",
        "SYSTEMD_PAGER": "",
    }
    name = f"cxrd-test-{uuid.uuid4().hex[:12]}"
    cgroups = []
    for mount in _cgroup_mounts():
        path = mount / name
        path.mkdir()
        cgroups.append(path / "cgroup.procs")
    # The shell joins the private cgroups, then becomes the manager: nothing of
    # it ever runs in the caller's cgroup.
    joins = "".join(f'echo $$ > "{procs}" && ' for procs in cgroups)
    log_path = root / "systemd-user.log"
    manager_env = {k: v for k, v in env.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["/bin/sh", "-c", f"{joins}exec {SYSTEMD} --user"],
            env=manager_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,
        )
    manager = UserManager(
        root=root,
        home=home,
        runtime_dir=runtime_dir,
        config_home=config_home,
        data_home=data_home,
        env=env,
        process=process,
        cgroups=[p.parent for p in cgroups],
        log_path=log_path,
    )
    try:
        # --wait blocks until the manager finished starting (default.target).
        wait_until(
            lambda: (runtime_dir / "systemd" / "private").exists() or process.poll() is not None,
            "the manager's private socket",
            timeout=TIMEOUT,
        )
        if process.poll() is not None:
            raise AssertionError(f"systemd --user exited {process.returncode}:\n{manager.log()}")

        # The private socket can exist a moment before the manager answers on it.
        def started() -> str:
            result = manager.systemctl("is-system-running", "--wait", check=False)
            return result.stdout.strip() or ("" if process.poll() is None else "exited")

        state = wait_until(started, "systemd --user to answer", timeout=TIMEOUT)
        if state not in ("running", "degraded"):
            raise AssertionError(f"systemd --user is {state!r}:\n{manager.log()}")
        wait_until(lambda: (runtime_dir / "bus").exists(), "the user bus socket", timeout=TIMEOUT)
    except BaseException:
        _stop_manager(manager)
        raise
    return manager


def _stop_manager(manager: UserManager) -> None:
    process = manager.process
    if process.poll() is None:
        # SIGTERM: the user manager stops every unit (their stop logic runs), then exits.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=TIMEOUT * 3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=TIMEOUT)
    for cgroup in manager.cgroups:
        kill = cgroup / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
            wait_until(
                lambda cg=cgroup: "populated 0" in (cg / "cgroup.events").read_text(),
                f"{cgroup} to empty",
                timeout=TIMEOUT,
            )
    for cgroup in manager.cgroups:
        _remove_cgroup_tree(cgroup)


def _remove_cgroup_tree(top: Path) -> None:
    if not top.exists():
        return
    dirs = sorted(
        (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
    )
    for path in [*dirs, top]:
        for attempt in range(50):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                # v1 hierarchies have no cgroup.kill: kill stragglers there too.
                procs = path / "cgroup.procs"
                with contextlib.suppress(OSError, ValueError):
                    for pid in procs.read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                if attempt == 49:
                    raise
                time.sleep(0.05)


@pytest.fixture
def systemd_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserManager]:
    """A private, running ``systemd --user`` with its own session bus; stopped and emptied after."""
    reason = _why_no_systemd()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("systemd-user")
    manager = _start_manager(root)
    try:
        yield manager
    finally:
        _stop_manager(manager)
