"""The Debian package: built for real by packaging/build-deb.sh, then inspected and unpacked."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_systemd import UserManager
from support import TIMEOUT, free_port

from cxrd import constants as C

pytestmark = pytest.mark.slow  # left out of the floors run (scripts/test.sh)

REPO = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = Path("/usr/bin/python3.11")


@dataclass(frozen=True)
class Built:
    deb: Path
    files: dict[str, str]  # path in the package -> the `dpkg-deb -c` line
    root: Path  # the package unpacked with dpkg-deb -x


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(
        ["dpkg-deb", *args], capture_output=True, text=True, check=True, timeout=TIMEOUT * 6
    ).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed: not a Debian system")
    if not DEBIAN_PYTHON.exists():
        pytest.skip(f"{DEBIAN_PYTHON} (Debian 12's python) is not installed")
    out = tmp_path_factory.mktemp("deb")
    # Without the runtime (isaacteleop + numpy, ~110 MB): the same script, a faster build.
    result = subprocess.run(
        ["bash", str(REPO / "packaging" / "build-deb.sh"), "--without-cloudxr",
         "--out", str(out), "--compress", "gzip"],
        capture_output=True, text=True, timeout=TIMEOUT * 30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (deb,) = out.glob("cxrd_*.deb")
    files = {}
    for line in _dpkg_deb("-c", str(deb)).splitlines():
        name = line.split(None, 5)[5].split(" -> ")[0].removeprefix(".")
        files[name.rstrip("/") or "/"] = line
    root = out / "unpacked"
    _dpkg_deb("-x", str(deb), str(root))
    yield Built(deb=deb, files=files, root=root)


def test_package_holds_the_units_the_activation_file_and_cxrd(built: Built) -> None:
    for path in (
        "/usr/lib/systemd/user/cloudxr.service",
        "/usr/lib/systemd/user/cloudxr@.service",
        "/usr/share/dbus-1/services/io.github.cxrd.Daemon1.service",
        "/usr/lib/cxrd/bin/python",
        "/usr/lib/cxrd/bin/cxrd",
        "/usr/lib/cxrd/bin/cxrctl",
        "/usr/lib/cxrd/lib/python3.11/site-packages/cxrd/daemon.py",
        "/usr/lib/cxrd/lib/python3.11/site-packages/cxrd/data/cloudxr.service",
        "/usr/share/doc/cxrd/copyright",
        "/usr/lib/firewalld/services/cloudxr.xml",
        "/usr/lib/firewalld/services/cloudxr-native.xml",
        "/etc/ufw/applications.d/cloudxr",
    ):
        assert path in built.files, f"{path} missing from {built.deb.name}"
    assert built.files["/usr/bin/cxrd"].endswith("-> ../lib/cxrd/bin/cxrd")
    assert built.files["/usr/bin/cxrctl"].endswith("-> ../lib/cxrd/bin/cxrctl")
    # What the package ships is the checked-in unit, which runs /usr/bin/cxrd.
    unit = (built.root / "usr/lib/systemd/user/cloudxr.service").read_text()
    assert unit == (REPO / "systemd" / "cloudxr.service").read_text()
    assert "\nExecStart=/usr/bin/cxrd --bus session\n" in unit
    template = (built.root / "usr/lib/systemd/user/cloudxr@.service").read_text()
    assert template == (REPO / "systemd" / "cloudxr@.service").read_text()
    assert "\nExecStart=/usr/bin/cxrd --bus session --instance %i\n" in template
    activation = built.root / "usr/share/dbus-1/services/io.github.cxrd.Daemon1.service"
    assert "SystemdService=cloudxr.service" in activation.read_text()
    firewalld = (built.root / "usr/lib/firewalld/services/cloudxr.xml").read_text()
    for port in ('protocol="tcp" port="48322"', 'protocol="tcp" port="49100"', 'port="47998"'):
        assert port in firewalld
    ufw = (built.root / "etc/ufw/applications.d/cloudxr").read_text()
    assert "ports=48322,49100/tcp|47998/udp" in ufw and "[CloudXR native]" in ufw
    # Nothing the package owns is writable by others or owned by the builder.
    for line in built.files.values():
        mode, owner = line.split()[:2]
        assert owner == "root/root", line
        assert mode[8] != "w" or mode[0] == "l", line


def firewall_offline_cmd() -> str:
    """firewalld's own offline tool (Debian's firewalld; scripts/setup.sh installs it)."""
    tool = shutil.which("firewall-offline-cmd")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("firewall-offline-cmd is missing: scripts/setup.sh installs firewalld")
        pytest.skip("firewall-offline-cmd is not installed (Debian's firewalld)")
    return tool


def test_firewalld_loads_the_packaged_services_with_cxrds_ports(
    built: Built, tmp_path: Path
) -> None:
    """Real firewalld tooling on a throwaway copy of its configuration; the host's is untouched."""
    tool = firewall_offline_cmd()
    default = tmp_path / "default"  # firewalld's /usr/lib/firewalld, where the .deb puts them
    shutil.copytree("/usr/lib/firewalld", default)
    for name in ("cloudxr.xml", "cloudxr-native.xml"):
        shutil.copy(built.root / "usr/lib/firewalld/services" / name, default / "services")
    system = tmp_path / "etc"  # the admin's /etc/firewalld
    system.mkdir()
    if Path("/etc/firewalld/firewalld.conf").exists():
        shutil.copy("/etc/firewalld/firewalld.conf", system)

    def offline(*args: str) -> str:
        done = subprocess.run(
            [tool, "--system-config", str(system), "--default-config", str(default), *args],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"firewall-offline-cmd {args}: {done.stdout}{done.stderr}"
        return done.stdout

    offline("--check-config")
    web = offline("--info-service=cloudxr")
    proxy, signaling, media = C.DEFAULT_PROXY_PORT, C.DEFAULT_BACKEND_PORT, C.DEFAULT_MEDIA_PORT
    assert f"  ports: {proxy}/tcp {signaling}/tcp {media}/udp\n" in web, web
    native = offline("--info-service=cloudxr-native")
    assert "  ports: 48010/tcp 47998-48000/udp 48005/udp 48008/udp 48012/udp\n" in native
    # What the README tells users to run (firewall-cmd --permanent --add-service=cloudxr).
    offline("--add-service=cloudxr")
    assert "cloudxr" in offline("--list-services").split()


def test_package_holds_completions_and_man_pages_that_render(built: Built) -> None:
    for prog in ("cxrctl", "cxrd"):
        for path in (
            f"/usr/share/bash-completion/completions/{prog}",
            f"/usr/share/zsh/vendor-completions/_{prog}",
            f"/usr/share/fish/vendor_completions.d/{prog}.fish",
        ):
            assert path in built.files, f"{path} missing from {built.deb.name}"
            assert prog in (built.root / path.lstrip("/")).read_text()
    pages = {"man1/cxrctl.1.gz": "CXRCTL(1)", "man8/cxrd.8.gz": "CXRD(8)"}
    pages["man5/cxrd.toml.5.gz"] = "CXRD.TOML(5)"
    for page, title in pages.items():
        assert f"/usr/share/man/{page}" in built.files
        shown = subprocess.run(
            ["man", "-l", str(built.root / "usr/share/man" / page)],
            env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        ).stdout
        assert shown.startswith(title), shown[:200]
    site = "/usr/lib/cxrd/lib/python3.11/site-packages"
    assert not [p for p in built.files if p.startswith(f"{site}/argparse_manpage")]


def test_package_declares_its_dependencies(built: Built) -> None:
    fields = {
        key: _dpkg_deb("-f", str(built.deb), key).strip()
        for key in ("Package", "Version", "Architecture", "Depends", "Recommends")
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert fields["Package"] == "cxrd"
    assert fields["Version"] == f"{project['version']}-1"
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert fields["Architecture"] == arch
    assert "python3.11" in fields["Depends"]
    assert "libc6 (>= 2." in fields["Depends"]
    assert "dbus-user-session" in fields["Recommends"]


def test_unpacked_environment_runs_cxrd_with_every_dependency(built: Built) -> None:
    python = built.root / "usr/lib/cxrd/bin/python"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(built.root)}
    # pip check: every requirement of cxrd (dbus-fast, websockets, ...) is there, in range.
    check = subprocess.run(
        [str(python), "-I", "-m", "pip", "check"],
        capture_output=True, text=True, env=env, timeout=TIMEOUT * 3, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    probe = subprocess.run(
        [str(python), "-I", "-c",
         "import sys, cxrd, cxrd.cli.install, dbus_fast, websockets, cryptography, sdnotify; "
         "print(sys.prefix); print(cxrd.__file__)"],
        capture_output=True, text=True, env=env, timeout=TIMEOUT * 3, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    prefix, module = probe.stdout.split()
    assert prefix == str(built.root / "usr/lib/cxrd")
    assert module.startswith(prefix + "/lib/python3.11/site-packages/"), "not the repo's cxrd"
    # The entry points run the package's own interpreter once installed.
    for script in ("cxrd", "cxrctl"):
        first = (built.root / "usr/lib/cxrd/bin" / script).read_text().splitlines()[0]
        assert first == "#!/usr/lib/cxrd/bin/python"
    usage = subprocess.run(
        [str(python), "-I", "-m", "cxrd", "--help"],
        capture_output=True, text=True, env=env, timeout=TIMEOUT * 3, check=False,
    )  # fmt: skip
    assert usage.returncode == 0, usage.stderr
    assert "--runtime" in usage.stdout


def test_no_trace_of_the_build_machine_in_the_package(built: Built) -> None:
    leaks = subprocess.run(
        ["grep", "-rlE", "cxrd-deb\\.|/work/|\\.pyenv", str(built.root)],
        capture_output=True, text=True, timeout=TIMEOUT * 3, check=False,
    )  # fmt: skip
    assert leaks.stdout == "", f"build paths baked into: {leaks.stdout}"
    compiled = [name for name in built.files if "__pycache__" in name]
    assert compiled == [], "byte-code belongs to postinst, not the package"


def _dpkg_status(package: str) -> str:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", package],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.stdout.strip()


@pytest.mark.skipif(
    not (os.environ.get("CI") or os.environ.get("CXRD_TEST_DPKG_INSTALL")),
    reason="installs the package into this machine's /usr: CI only (or CXRD_TEST_DPKG_INSTALL=1)",
)
def test_installed_package_runs_under_systemd_and_purges_clean(
    built: Built, systemd_user: UserManager
) -> None:
    if os.geteuid() != 0:
        pytest.skip("dpkg -i needs root")
    if _dpkg_status("cxrd") not in ("", "not-installed", "config-files"):
        pytest.skip("a cxrd package is already installed here; leaving it alone")
    dpkg = ["dpkg", "--force-confold"]
    installed = subprocess.run(
        [*dpkg, "-i", str(built.deb)], capture_output=True, text=True, timeout=TIMEOUT * 12,
        check=False,
    )  # fmt: skip
    try:
        assert installed.returncode == 0, installed.stdout + installed.stderr
        owned = subprocess.run(
            ["dpkg", "-L", "cxrd"], capture_output=True, text=True, check=True
        ).stdout.split()
        # No unit in the user's own dirs: the manager finds the packaged one.
        config = systemd_user.config_home / "cxrd" / "cxrd.toml"
        config.parent.mkdir(parents=True)
        install_dir = systemd_user.root / "cloudxr"
        config.write_text(
            f'install_dir = "{install_dir}"\n[runtime]\nbackend = "sim"\n'
            f"[proxy]\nport = {free_port()}\nbackend_port = {free_port()}\n"
        )
        systemd_user.systemctl("daemon-reload")
        props = systemd_user.show("cloudxr.service", "FragmentPath")
        assert props["FragmentPath"] == "/usr/lib/systemd/user/cloudxr.service"
        systemd_user.systemctl("start", "cloudxr.service", timeout=TIMEOUT * 3)
        assert (install_dir / "run" / "runtime_started").exists()
        main_pid = systemd_user.show("cloudxr.service", "MainPID")["MainPID"]
        exe = os.readlink(f"/proc/{main_pid}/exe")
        assert exe.startswith("/usr/bin/python3.11"), exe  # Debian's python, not the build's
        status = systemd_user.run("/usr/bin/cxrctl", "status", check=False)
        assert status.returncode == 0, status
        systemd_user.systemctl("stop", "cloudxr.service", timeout=TIMEOUT * 3)
    finally:
        purged = subprocess.run(
            [*dpkg, "--purge", "cxrd"], capture_output=True, text=True, timeout=TIMEOUT * 6,
            check=False,
        )  # fmt: skip
    assert purged.returncode == 0, purged.stdout + purged.stderr
    left = [path for path in owned if os.path.isfile(path) or os.path.islink(path)]
    assert left == [], f"left behind by purge: {left[:5]}"
    assert not Path("/usr/lib/cxrd").exists(), "postinst byte-code must go with the package"
