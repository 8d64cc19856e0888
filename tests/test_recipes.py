"""The container and Kubernetes recipes under packaging/, checked without a registry.

Every Kubernetes manifest validates against the Kubernetes 1.33 schema that
the pinned ``kubernetes-validate`` ships (no network); the compose file is
parsed and its references to the Containerfile checked; the arguments each
recipe passes to cxrd are ones cxrd's own parser accepts. tests/test_image.py
builds the image and runs it under podman.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import kubernetes_validate
import pytest
import yaml

from cxrd.config import load_config, parse_listen
from cxrd.constants import STAND_ASIDE
from cxrd.daemon import ACCEPT_EULA_ENV, build_parser, overrides_from

ROOT = Path(__file__).resolve().parent.parent
CONTAINER = ROOT / "packaging" / "container"
KUBE = ROOT / "packaging" / "kubernetes"
K8S_VERSION = "1.33.0"  # sidecar containers (restartPolicy on an init container) are GA


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def containerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, one entry per line (continuations joined)."""
    text = re.sub(r"\\\n", " ", (CONTAINER / "Containerfile").read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.setdefault(word.upper(), []).append(" ".join(rest.split()))
    return out


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def health_port(args: list[str]) -> int:
    return parse_listen(args[args.index("--health-listen") + 1])[1]


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [item for item in items if item["name"] == name]
    return found


# --- the Containerfile ------------------------------------------------------------------


def test_containerfile_runs_cxrd_without_a_bus_as_a_non_root_user_with_a_healthcheck() -> None:
    cf = containerfile()
    base = re.search(r"BASE_IMAGE=(\S+)", " ".join(cf["ARG"]))
    assert base and re.fullmatch(r"nvcr\.io/nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu24\.04", base[1])
    assert cf["FROM"] == ["${BASE_IMAGE} AS base", "base AS wheel", "base"]
    assert exec_form(cf["ENTRYPOINT"][0]) == ["cxrd", "--bus", "none"]
    args = exec_form(cf["CMD"][0])
    parsed = build_parser().parse_args(["--bus", "none", *args])
    assert parsed.bus == "none" and parsed.health_listen == "0.0.0.0:48080"
    (healthcheck,) = cf["HEALTHCHECK"]
    probe = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert probe[-1] == f"http://127.0.0.1:{health_port(args)}/readyz"
    assert cf["USER"] == ["1000:1000"]
    assert "--uid 1000" in " ".join(cf["RUN"])
    assert exec_form(cf["VOLUME"][0]) == ["/home/cloudxr/.cloudxr"]


def test_containerfile_installs_this_checkout_with_the_runtime_and_keeps_no_secret() -> None:
    cf = containerfile()
    # cxrd is not on an index: a wheel of the build context, installed with [cloudxr].
    assert cf["COPY"][:2] == ["pyproject.toml README.md /src/", "cxrd /src/cxrd"]
    assert cf["COPY"][2] == "--from=wheel /wheels /tmp/wheels"
    wheel, install = (run for run in cf["RUN"] if "pip " in run)
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src" in wheel
    assert (
        'pip install --no-cache-dir "$1[cloudxr]"' in install
        and "set -- /tmp/wheels/cxrd-*.whl" in install
    )
    assert not re.search(r"pip install \S*cxrd\[", " ".join(cf["RUN"])), "never from an index"
    # A proxy's CA and pip.conf reach pip as build secrets, each for its one step.
    for run in (wheel, install):
        assert "--mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca" in run
        assert "--mount=type=secret,id=pip.conf,target=/etc/pip.conf" in run
    assert not [env for env in cf["ENV"] if "PIP_CERT" in env or "CA_BUNDLE" in env]
    # The context is what the build copies from it and nothing else (no .venv, .git or
    # certificates sent to the builder); the byte-code the tests leave in cxrd/ stays out
    # too (docker and podman read this).
    text = (CONTAINER / "Containerfile.dockerignore").read_text()
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    copied = {src for c in cf["COPY"] if not c.startswith("--from") for src in c.split()[:-1]}
    assert rules[0] == "*" and {rule[1:] for rule in rules if rule[0] == "!"} == copied
    assert "**/__pycache__" in rules


# --- compose.yaml -------------------------------------------------------------------------


def test_compose_builds_the_containerfile_and_the_app_waits_for_health() -> None:
    compose = load(CONTAINER / "compose.yaml")
    cf = containerfile()
    cxrd, app = compose["services"]["cxrd"], compose["services"]["app"]
    built = (CONTAINER / cxrd["build"]["context"] / cxrd["build"]["dockerfile"]).resolve()
    assert built == CONTAINER / "Containerfile"
    (volume,) = exec_form(cf["VOLUME"][0])
    for service in (cxrd, app):
        assert service["network_mode"] == "host"
        assert service["user"] == cf["USER"][0]
        (mount,) = service["volumes"]
        assert mount["target"] == volume and mount["bind"]["create_host_path"] is False
    assert cxrd["volumes"][0]["source"] == app["volumes"][0]["source"]
    (gpu,) = cxrd["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and gpu["capabilities"] == ["gpu"]
    # The command replaces the image's CMD and still parses; the healthcheck asks its port.
    command = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", arg) for arg in cxrd["command"]]
    assert build_parser().parse_args(["--bus", "none", *command]).profile == "Quest3"
    assert cxrd["healthcheck"]["test"][-1] == f"http://127.0.0.1:{health_port(command)}/readyz"
    assert app["depends_on"] == {"cxrd": {"condition": "service_healthy"}}
    assert f". {volume}/run/cloudxr.env && exec" in app["entrypoint"][2]
    assert app["environment"] == dict(STAND_ASIDE), "Isaac Lab stands aside for cxrd"
    assert "CXRD_ACCEPT_EULA" in cxrd["environment"]


# --- Kubernetes -----------------------------------------------------------------------------


def manifests() -> list[Path]:
    return sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_every_manifest_validates_against_the_pinned_kubernetes_schema(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_the_validator_refuses_a_misspelled_field() -> None:
    broken = load(KUBE / "deployment.yaml")
    pod(broken)["initContainers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_nothing_else() -> None:
    kustomization = load(KUBE / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in manifests()]
    assert [image["name"] for image in kustomization["images"]] == ["cxrd"]


def test_deployment_probes_gpu_endpoint_ip_and_shared_install_dir() -> None:
    deployment = load(KUBE / "deployment.yaml")
    spec = pod(deployment)
    cxrd = by_name(spec["initContainers"], "cxrd")
    app = by_name(spec["containers"], "app")
    assert cxrd["restartPolicy"] == "Always", "a sidecar: the app starts once it is ready"
    assert cxrd["resources"]["limits"] == {"nvidia.com/gpu": 1}
    ports = {p["name"]: p["containerPort"] for p in cxrd["ports"]}
    assert ports["health"] == health_port(cxrd["args"]) and ports["wss"] == 48322
    build_parser().parse_args(["--bus", "none", *cxrd["args"]])
    assert containerfile()["ENTRYPOINT"] == ['["cxrd", "--bus", "none"]']
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/livez"),
    ):
        assert cxrd[probe]["httpGet"] == {"path": path, "port": "health"}, probe
    env = {e["name"]: e["valueFrom"] for e in cxrd["env"]}
    assert env["NV_CXR_ENDPOINT_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["CXRD_ACCEPT_EULA"]["configMapKeyRef"]["key"] == "CXRD_ACCEPT_EULA"
    (volume,) = spec["volumes"]
    assert volume["emptyDir"] == {}
    (cf_volume,) = exec_form(containerfile()["VOLUME"][0])
    for container in (cxrd, app):
        assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": cf_volume}]
    assert f". {cf_volume}/run/cloudxr.env" in " ".join(app["command"])
    assert {e["name"]: e["value"] for e in app["env"]} == dict(STAND_ASIDE)
    assert spec["securityContext"]["runAsUser"] == 1000
    service = load(KUBE / "service.yaml")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["wss"]


def test_the_deployment_is_what_the_image_runs_and_cxrd_accepts(tmp_path: Path) -> None:
    """The kubelet runs the image's ENTRYPOINT with the manifest's args: every port, probe,
    variable and user the manifest names is the one cxrd then really uses.
    (tests/test_image.py runs the manifest's container on the built image.)"""
    deployment = load(KUBE / "deployment.yaml")
    spec = pod(deployment)
    cxrd = by_name(spec["initContainers"], "cxrd")
    cf = containerfile()
    assert "command" not in cxrd, "the image's ENTRYPOINT runs, not a command of the manifest's"
    args = build_parser().parse_args([*exec_form(cf["ENTRYPOINT"][0])[1:], *cxrd["args"]])
    (tmp_path / "cxrd.toml").write_text("")  # no config file in the pod: the defaults
    config = load_config(tmp_path / "cxrd.toml", overrides=overrides_from(args), environ={})
    ports = {p["name"]: p["containerPort"] for p in cxrd["ports"]}
    assert config.health.address == ("0.0.0.0", ports["health"]), "probes reach it from the kubelet"
    assert config.proxy.port == ports["wss"] and config.proxy.host == "0.0.0.0"
    assert config.runtime.signaling_port == ports["signaling"]
    assert config.bus == "none"
    assert set(ports.values()) <= {int(p) for p in " ".join(cf["EXPOSE"]).split()}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert cxrd[probe]["httpGet"]["port"] in ports, probe
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["health"])
    assert annotations["prometheus.io/path"] == "/metrics"
    assert ACCEPT_EULA_ENV in {e["name"] for e in cxrd["env"]}
    uid, gid = (int(n) for n in cf["USER"][0].split(":"))
    context = spec["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (uid, gid, gid)
    # The image's own HEALTHCHECK asks the port the manifest's probes ask.
    (healthcheck,) = cf["HEALTHCHECK"]
    assert f"127.0.0.1:{ports['health']}/readyz" in healthcheck


def _merge(base: Any, patch: Any) -> Any:
    """Enough of a strategic merge for our patch: maps merge, named lists merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all("name" in x for x in patch):
        merged = [copy.deepcopy(x) for x in base]
        for item in patch:
            names = [x.get("name") for x in merged]
            if item["name"] in names:
                i = names.index(item["name"])
                merged[i] = _merge(merged[i], item)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def test_hostnetwork_overlay_gives_the_node_address_and_validates() -> None:
    overlay = KUBE / "hostnetwork"
    kustomization = load(overlay / "kustomization.yaml")
    (resource,) = kustomization["resources"]
    (patch_ref,) = kustomization["patches"]
    base = load((overlay / resource).resolve())
    patch = load(overlay / patch_ref["path"])
    assert (patch["kind"], patch["metadata"]["name"]) == (base["kind"], base["metadata"]["name"])
    merged = _merge(base, patch)
    kubernetes_validate.validate(merged, K8S_VERSION, strict=True)
    spec = pod(merged)
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    env = {e["name"]: e for e in by_name(spec["initContainers"], "cxrd")["env"]}
    assert env["NV_CXR_ENDPOINT_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert "CXRD_ACCEPT_EULA" in env, "the patch adds to the environment, it does not replace it"


def test_docs_name_every_recipe_file() -> None:
    fleet = (ROOT / "docs" / "fleet.md").read_text()
    for path in [CONTAINER / "Containerfile", CONTAINER / "compose.yaml", *KUBE.rglob("*.yaml")]:
        assert str(path.relative_to(ROOT)) in fleet, path
    assert shlex.split("kubectl apply -k packaging/kubernetes")[-1] in fleet


def test_every_shipped_xml_file_is_well_formed() -> None:
    # firewalld cannot load a service whose comment holds "--" (issue 16, item 7).
    shipped = [*(ROOT / "packaging").rglob("*.xml"), *(ROOT / "dbus").glob("*.xml")]
    assert len(shipped) >= 3
    for path in shipped:
        ElementTree.parse(path)  # raises ParseError naming the line
