"""The container image, built from this checkout and run for real under podman.

No registry here: the base is Debian 12 made by ``mmdebstrap`` and ``podman
import``ed, cached between runs (the tarball under ``CXRD_TEST_CACHE``, the
image in podman's store). The build is the project's own Containerfile from
the project root, as a user runs it, with what this machine's podman needs
(a private ``containers.conf`` through ``CONTAINERS_CONF``: runc, and no
ulimits above the machine's) and what its pip needs (the host's CA bundle and
index as build secrets, never in the image). Containers use the host's
network or none, never a bridge. ``pytest -s`` shows the figures.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import TIMEOUT, free_port, wait_until
from test_container import child_of, metric, wait_ready, zombies
from test_health import answer

ROOT = Path(__file__).resolve().parent.parent
CONTAINER = ROOT / "packaging" / "container"
DEPLOYMENT = ROOT / "packaging" / "kubernetes" / "deployment.yaml"
CACHE = Path(os.environ.get("CXRD_TEST_CACHE", "/var/cache/cxrd-tests"))
BASE_PACKAGES = "python3,python3-venv,ca-certificates,curl,passwd"
IMAGE = "localhost/cxrd-test:checkout"
HEALTH_PORT = 48080  # the one the image's HEALTHCHECK asks
INSTALL = "/home/cloudxr/.cloudxr"  # the image's VOLUME
GRACE = 30  # compose's stop_grace_period, the Deployment's terminationGracePeriodSeconds

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# One figure per line of the closing note; `pytest -s tests/test_image.py` prints them.
FIGURES: dict[str, object] = {}


@dataclass(frozen=True)
class Podman:
    env: dict[str, str]
    version: tuple[int, ...]

    def __call__(
        self, *args: str, timeout: float = 6 * TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
        return done

    def inspect(self, what: str, name: str, template: str) -> str:
        return self(what, "inspect", "--format", template, name).stdout.strip()


def _containers_conf(path: Path) -> Path:
    """runc, as crun refuses this machine's cgroup layout; and no ulimits of podman's own.

    Podman's built-in default asks for nofile=1048576, above this machine's hard
    limit, and runc cannot raise it (EPERM); with none, containers inherit the
    machine's limits.
    """
    path.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
    return path


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/setup.sh installs it on Debian)")
    env = dict(
        os.environ,
        CONTAINERS_CONF=str(
            _containers_conf(tmp_path_factory.mktemp("podman") / "containers.conf")
        ),
    )
    info = subprocess.run(
        ["podman", "info", "--format", "{{.Version.Version}}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {(info.stderr.strip().splitlines() or ['?'])[-1]}")
    version = tuple(int(part) for part in info.stdout.strip().split(".")[:2])
    return Podman(env, version)


@pytest.fixture(scope="module")
def base_image(podman: Podman) -> str:
    """Debian 12 with python3 (3.11), from the cache or made once by mmdebstrap."""
    key = hashlib.sha256(f"bookworm minbase {BASE_PACKAGES}".encode()).hexdigest()[:12]
    tag = f"localhost/cxrd-test-base:{key}"
    began = time.monotonic()
    if podman("image", "exists", tag, check=False).returncode == 0:
        FIGURES["base_from"] = "podman's image store"
        return tag
    tarball = CACHE / f"debian-bookworm-{key}.tar"
    FIGURES["base_from"] = f"cached {tarball}"
    if not tarball.exists():
        assert shutil.which("mmdebstrap"), "mmdebstrap is not installed (scripts/setup.sh does)"
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(f".{os.getpid()}.part")
        try:
            subprocess.run(
                ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={BASE_PACKAGES}",
                 "--format=tar", "bookworm", str(partial)],
                check=True, timeout=60 * TIMEOUT,
            )  # fmt: skip
            partial.rename(tarball)
        finally:
            partial.unlink(missing_ok=True)
        FIGURES["base_from"] = "mmdebstrap, now cached"
    podman("import", str(tarball), tag, timeout=30 * TIMEOUT)
    FIGURES["base_seconds"] = round(time.monotonic() - began, 1)
    return tag


def _pip_config(key: str) -> str:
    got = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", key],
        capture_output=True, text=True, timeout=3 * TIMEOUT,
    )  # fmt: skip
    return got.stdout.strip() if got.returncode == 0 else ""


def pip_secrets(tmp: Path) -> list[str]:
    """``--secret`` arguments: the CA bundle and index this host's pip uses, for the build only."""
    ca = (
        os.environ.get("PIP_CERT")
        or _pip_config("global.cert")
        or os.environ.get("REQUESTS_CA_BUNDLE")
        or os.environ.get("SSL_CERT_FILE")
        or ssl.get_default_verify_paths().cafile
    )
    args = ["--secret", f"id=pip-ca,src={ca}"] if ca and Path(ca).is_file() else []
    index = os.environ.get("PIP_INDEX_URL") or _pip_config("global.index-url")
    if index:
        (tmp / "pip.conf").write_text(f"[global]\nindex-url = {index}\n")
        args += ["--secret", f"id=pip.conf,src={tmp / 'pip.conf'}"]
    return args


def sources(root: Path) -> dict[str, str]:
    """``cxrd/...py`` -> sha256 of every module of the package under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "cxrd").rglob("*.py"))
        if "__pycache__" not in p.parts
    }


@dataclass(frozen=True)
class Built:
    tag: str
    began: float  # time.time() when its build began


@pytest.fixture(scope="module")
def image(podman: Podman, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Built:
    build = [
        "build", "--format", "docker", "--network", "host",
        "--build-arg", f"BASE_IMAGE={base_image}",
        *pip_secrets(tmp_path_factory.mktemp("pip")),
        "-f", str(CONTAINER / "Containerfile"), "-t", IMAGE, str(ROOT),
    ]  # fmt: skip
    built = [_image_id(podman)]
    since = time.time()
    began = time.monotonic()
    podman(*build, timeout=60 * TIMEOUT)
    FIGURES["build_seconds"] = round(time.monotonic() - began, 1)
    built.append(_image_id(podman))
    began = time.monotonic()
    podman(*build, timeout=60 * TIMEOUT)  # every layer cached, unless the tree just changed
    FIGURES["rebuild_seconds"] = round(time.monotonic() - began, 1)
    FIGURES["image_mb"] = round(int(podman.inspect("image", IMAGE, "{{.Size}}")) / 1e6)
    # The image an older checkout made, with the layers only it used (its venv): one
    # image's worth of disk per machine. The wheel stage's layers stay, for the cache.
    for old in set(built) - {_image_id(podman), ""}:
        podman("rmi", old, check=False)
    return Built(IMAGE, since)


def _image_id(podman: Podman) -> str:
    return podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()


def inspect_image(podman: Podman) -> dict[str, Any]:
    """``podman image inspect``: ``Config`` (the OCI part) and ``Healthcheck`` beside it."""
    found: dict[str, Any] = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    return found


def test_the_image_holds_this_checkout_and_keeps_its_healthcheck(
    podman: Podman, image: Built
) -> None:
    version = podman(
        "run", "--rm", "--network", "none", "--entrypoint", "cxrd", image.tag, "--version"
    )
    ours = subprocess.run(
        [sys.executable, "-m", "cxrd", "--version"],
        capture_output=True, text=True, timeout=3 * TIMEOUT,
    )  # fmt: skip
    assert version.stdout.strip() == ours.stdout.strip() != ""
    listing = (
        "import cxrd, hashlib, json, pathlib; root = pathlib.Path(cxrd.__file__).parent.parent;"
        " print(json.dumps({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()"
        " for p in sorted((root / 'cxrd').rglob('*.py')) if '__pycache__' not in p.parts}))"
    )
    inside = json.loads(
        podman(
            "run", "--rm", "--network", "none", "--entrypoint", "python3", image.tag, "-c", listing
        ).stdout
    )
    here = sources(ROOT)
    differ = {path for path in inside.keys() | here.keys() if inside.get(path) != here.get(path)}
    # Only a file edited while the image built may differ (never in CI: nothing edits there).
    edited = {
        p for p in differ if not (ROOT / p).exists() or (ROOT / p).stat().st_mtime > image.began
    }
    assert differ == edited, f"the image's cxrd is not this checkout's: {sorted(differ - edited)}"
    found = inspect_image(podman)
    # podman's default (OCI) format would have dropped it; --format docker keeps it.
    assert found["Healthcheck"]["Test"][-1] == f"http://127.0.0.1:{HEALTH_PORT}/readyz"
    assert found["Config"]["Entrypoint"] == ["cxrd", "--bus", "none"]
    assert found["Config"]["User"] == "1000:1000"
    # The build's secrets (CA bundle, pip.conf) were mounts of one step each, never layers.
    look = "ls -A /run/secrets; ls /etc/pip.conf 2>/dev/null; env | grep PIP_CERT; true"
    left = podman("run", "--rm", "--network", "none", "--entrypoint", "sh", image.tag, "-c", look)
    assert left.stdout == "", f"a build secret stayed in the image: {left.stdout!r}"
    print(json.dumps({"image_figures": FIGURES}))


# --- cxrd as PID 1 of the image, and an application container beside it ----------------------

# What the application runs once it sourced cloudxr.env: the runtime's files through the
# shared install dir, and cxrd's health through the shared network.
APP_CODE = (
    "import os, urllib.request; run = os.environ['NV_CXR_RUNTIME_DIR'];"
    " print('OpenXR runtime:', os.environ['XR_RUNTIME_JSON']);"
    " print('runtime dir:', run, sorted(os.listdir(run)));"
    f" ready = urllib.request.urlopen('http://127.0.0.1:{HEALTH_PORT}/readyz', timeout=5);"
    " print('readyz', ready.status)"
)


def app_entrypoint() -> list[str]:
    """compose.yaml's application entrypoint (``$$`` is compose's ``$``): sources cloudxr.env."""
    compose = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    return [arg.replace("$$", "$") for arg in compose["services"]["app"]["entrypoint"]]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _nspid(host_pid: int) -> int:
    """The pid a host process has in its own PID namespace (the last NSpid field)."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {host_pid}")


@pytest.fixture
def volume(podman: Podman) -> Iterator[str]:
    """A named volume for the install dir; its containers and it are removed after."""
    name = f"cxrd-test-{os.getpid()}-{time.monotonic_ns()}"
    podman("volume", "create", name)
    yield name
    for container in podman("ps", "-aq", "--filter", f"volume={name}").stdout.split():
        print(podman("logs", container, check=False).stderr[-4000:])  # shown when a test failed
        podman("rm", "--force", "--time", "0", container, check=False)
    podman("volume", "rm", "--force", name, check=False)


def sim_command() -> list[str]:
    """cxrd's arguments: the sim on free ports, health on the port the HEALTHCHECK asks."""
    return [
        "--health-listen", f"127.0.0.1:{HEALTH_PORT}", "--runtime", "sim",
        "--proxy-port", str(free_port()), "--signaling-port", str(free_port()),
        "--media-port", str(free_port()),
    ]  # fmt: skip


def test_cxrd_is_pid_1_restarts_reaps_and_stops_and_an_application_shares_it(
    podman: Podman, image: Built, base_image: str, volume: str, tmp_path: Path
) -> None:
    assert not _listening(HEALTH_PORT), f"{HEALTH_PORT} is taken here; the HEALTHCHECK asks it"
    name = volume
    config = tmp_path / "cxrd.toml"
    config.write_text("[runtime.sim]\norphan_grandchild = true\n")  # an orphan for PID 1
    config.chmod(0o644)
    began = time.monotonic()
    podman("run", "-d", "--name", name, "--network", "host", "-e", "CXRD_ACCEPT_EULA=1",
           "-v", f"{volume}:{INSTALL}", "-v", f"{config}:/etc/cxrd.toml:ro",
           IMAGE, "--config", "/etc/cxrd.toml", *sim_command())  # fmt: skip
    wait_ready(HEALTH_PORT)
    FIGURES["seconds_to_readyz_200"] = round(time.monotonic() - began, 2)

    pid1 = int(podman.inspect("container", name, "{{.State.Pid}}"))
    assert _nspid(pid1) == 1 and "/opt/cxrd/bin/cxrd" in Path(f"/proc/{pid1}/cmdline").read_text()
    ns = os.readlink(f"/proc/{pid1}/ns/pid")
    healthcheck = podman("healthcheck", "run", name, check=False)
    assert healthcheck.returncode == 0, healthcheck.stdout + healthcheck.stderr
    assert podman.inspect("container", name, "{{.State.Healthcheck.Status}}") == "healthy"

    # The sim's orphan died re-parented to PID 1: reaped, no zombie left.
    wait_until(lambda: metric(HEALTH_PORT, "cxrd_orphans_reaped_total") >= 1, "the orphan reaped")
    wait_until(lambda: not zombies(ns), "no zombie in the container")

    restarts = metric(HEALTH_PORT, "cxrd_runtime_restarts_total")
    runtime = _nspid(child_of(ns, pid1, "-m cxrd.sim"))
    podman("exec", name, "sh", "-c", f"kill -KILL {runtime}")
    _, body = wait_until(lambda: (got := answer(HEALTH_PORT, "/readyz"))[0] == 503 and got, "503")
    assert body["state"] == "restarting" and "SIGKILL" in str(body["reason"])
    wait_until(lambda: answer(HEALTH_PORT, "/readyz")[0] == 200, "ready again", timeout=3 * TIMEOUT)
    assert metric(HEALTH_PORT, "cxrd_runtime_restarts_total") == restarts + 1

    # run/cloudxr.env: uid 1000's alone, on the volume the application mounts.
    mount = Path(podman.inspect("volume", volume, "{{.Mountpoint}}"))
    env_file = mount / "run" / "cloudxr.env"
    assert (env_file.stat().st_uid, env_file.stat().st_mode & 0o777) == (1000, 0o600)
    assert (env_file.parent.stat().st_uid, env_file.parent.stat().st_mode & 0o777) == (1000, 0o700)
    app = podman("run", "--rm", "--network", f"container:{name}", "--user", "1000:1000",
                 "-v", f"{volume}:{INSTALL}", "-e", "ISAACLAB_CXR_SKIP_AUTOLAUNCH=1",
                 "--entrypoint", app_entrypoint()[0], base_image, *app_entrypoint()[1:],
                 "python3", "-c", APP_CODE)  # fmt: skip
    assert f"OpenXR runtime: {INSTALL}/openxr_cloudxr.json" in app.stdout, app.stdout
    assert f"runtime dir: {INSTALL}/run" in app.stdout and "runtime_started" in app.stdout
    assert "readyz 200" in app.stdout

    began = time.monotonic()
    podman("stop", "--time", str(GRACE), name)
    FIGURES["seconds_to_stop"] = round(time.monotonic() - began, 2)
    assert podman.inspect("container", name, "{{.State.ExitCode}}") == "0"
    assert FIGURES["seconds_to_stop"] < GRACE / 3, "a stop well within the grace period"
    log = podman("logs", name).stderr
    assert "running as PID 1: reaping orphaned processes" in log
    assert "cxrd exits with code 0" in log
    print(json.dumps({"image_figures": FIGURES}))


# --- compose.yaml under podman-compose ---------------------------------------------------------


def test_compose_runs_cxrd_and_then_the_application_beside_it(
    podman: Podman, image: Built, base_image: str, tmp_path: Path
) -> None:
    podman_compose = Path(sys.executable).parent / "podman-compose"
    assert podman_compose.exists(), "no podman-compose in .venv (scripts/setup.sh installs it)"
    assert not _listening(HEALTH_PORT), f"{HEALTH_PORT} is taken here; the healthcheck asks it"
    install = tmp_path / "cloudxr"  # ~/.cloudxr: compose mounts it, never creates it
    install.mkdir(mode=0o700)
    os.chown(install, 1000, 1000)
    override = tmp_path / "compose.test.yaml"
    override.write_text(
        "# This checkout's image with the sim, and no GPU to reserve.\n"
        f"services:\n  cxrd:\n    image: {IMAGE}\n    command: {json.dumps(sim_command())}\n"
        "    deploy: !reset null\n"
        f"  app:\n    command: {json.dumps(['python3', '-c', APP_CODE])}\n"
        "    deploy: !reset null\n"
    )
    project = f"cxrdtest{os.getpid()}"
    env = dict(
        podman.env, CXRD_ACCEPT_EULA="1", APP_IMAGE=base_image, CXR_HOST_VOLUME_PATH=str(install)
    )
    files = ["-p", project, "-f", str(CONTAINER / "compose.yaml"), "-f", str(override)]

    def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(podman_compose), *files, *args],
            env=env, capture_output=True, text=True, timeout=6 * TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0 or not check, f"podman-compose {args}: {done.stderr}"
        return done

    def container(service: str) -> str:
        labels = [
            f"label=io.podman.compose.{k}={v}"
            for k, v in (("project", project), ("service", service))
        ]
        (name,) = podman(
            "ps", "-a", "--filter", labels[0], "--filter", labels[1], "--format", "{{.Names}}"
        ).stdout.split()
        return name

    try:
        compose("up", "-d", "cxrd")
        wait_until(_ready, "cxrd ready under compose", timeout=3 * TIMEOUT)
        cxrd = container("cxrd")
        assert podman("healthcheck", "run", cxrd, check=False).returncode == 0
        # podman-compose waits for `service_healthy` only on podman 4.6 or newer (it runs
        # `podman wait --condition=healthy`); older, it says so and starts the app at
        # once, so the app is started here once cxrd is healthy (the README says why).
        up = compose("up", "-d", "app")
        if podman.version < (4, 6):
            assert "Ignored cxrd condition check" in up.stdout + up.stderr
        app = container("app")
        assert podman("wait", app, timeout=3 * TIMEOUT).stdout.strip() == "0"
        said = podman("logs", app).stdout
        assert f"OpenXR runtime: {INSTALL}/openxr_cloudxr.json" in said and "readyz 200" in said
        assert (install / "run" / "cloudxr.env").stat().st_uid == 1000
        began = time.monotonic()
        compose("stop")
        FIGURES["compose_seconds_to_stop"] = round(time.monotonic() - began, 2)
        assert podman.inspect("container", cxrd, "{{.State.ExitCode}}") == "0"
    finally:
        print(compose("logs", check=False).stdout[-4000:])  # shown when the test failed
        compose("down")
    print(json.dumps({"image_figures": FIGURES}))


def _ready() -> bool:
    try:
        return answer(HEALTH_PORT, "/readyz")[0] == 200
    except ConnectionRefusedError:
        return False


# --- the Kubernetes Deployment, run as the kubelet would -------------------------------------


def test_the_deployments_container_runs_on_the_image_and_answers_its_probes(
    podman: Podman, image: Built, volume: str
) -> None:
    """The image's ENTRYPOINT, the manifest's args (plus the sim), env, user and mount, in a
    network of its own (a pod's): each probe and the metrics annotation answer 200."""
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    spec = deployment["spec"]["template"]["spec"]
    (cxrd,) = [c for c in spec["initContainers"] if c["name"] == "cxrd"]
    config = inspect_image(podman)["Config"]
    ports = {p["name"]: p["containerPort"] for p in cxrd["ports"]}
    assert {f"{port}/tcp" for port in ports.values()} <= set(config["ExposedPorts"])
    (mount,) = cxrd["volumeMounts"]
    assert mount["mountPath"] in config["Volumes"]
    user = f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
    assert user == config["User"]
    env = {"CXRD_ACCEPT_EULA": "1", "NV_CXR_ENDPOINT_IP": "127.0.0.1"}  # the config map, the pod IP
    assert set(env) == {e["name"] for e in cxrd["env"]}
    name = volume
    podman("run", "-d", "--name", name, "--network", "none", "--user", user,
           *(f"--env={k}={v}" for k, v in env.items()), "-v", f"{volume}:{mount['mountPath']}",
           IMAGE, *cxrd["args"], "--runtime", "sim")  # fmt: skip

    def answers_200(port: int, path: str) -> bool:
        url = f"http://127.0.0.1:{port}{path}"
        got = podman("exec", name, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url,
                     check=False)  # fmt: skip
        return got.stdout == "200"

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    asked = [(annotations["prometheus.io/port"], annotations["prometheus.io/path"])]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        asked.append((str(ports[cxrd[probe]["httpGet"]["port"]]), cxrd[probe]["httpGet"]["path"]))
    for port, path in asked:
        asks = functools.partial(answers_200, int(port), path)
        wait_until(asks, f"{path} on {port}", timeout=3 * TIMEOUT, interval=0.2)
    began = time.monotonic()
    podman("stop", "--time", str(spec["terminationGracePeriodSeconds"]), name)
    assert time.monotonic() - began < spec["terminationGracePeriodSeconds"] / 3
    assert podman.inspect("container", name, "{{.State.ExitCode}}") == "0"
