"""The other instances of this user: the ports they are configured with or hold.

Before a start, cxrd refuses a proxy, signaling or media port that another
instance uses, naming that instance, rather than letting two runtimes race
for one port (the loser's failure would name only a pid, or for the UDP media
port nothing at all). "Configured" is the other instance's config file;
"holds" is the ``cloudxr.env`` its live runtime published.
"""

from __future__ import annotations

import os
from pathlib import Path

from cxrd import constants as C
from cxrd import instances
from cxrd.config import Config, load_config
from cxrd.errors import CxrdError, StartFailed
from cxrd.instances import Instance
from cxrd.system import rundir
from cxrd.system.envfile import read_env_file


def ports_of(config: Config) -> dict[int, str]:
    """Port -> what it is for, of one instance's config."""
    ports = {config.proxy.port: "proxy port"} if config.proxy.enabled else {}
    ports[config.runtime.signaling_port] = "signaling port"
    ports[config.runtime.media_port] = "media port"
    return ports


def check_ports(config: Config) -> None:
    """StartFailed naming the instance and the port when another instance uses one of ours."""
    mine = ports_of(config)
    for other, where, used in _others(config):
        for port, what in mine.items():
            if port in used:
                theirs = used[port]
                raise StartFailed(
                    f"{what} {port} is the {theirs} of instance {other.label!r} ({where}); "
                    f"give instance {Instance(config.instance).label!r} another {what}"
                )


def _others(config: Config) -> list[tuple[Instance, str, dict[int, str]]]:
    found: list[tuple[Instance, str, dict[int, str]]] = []
    for other in sorted(set(instances.configured()) | set(_with_install_dirs())):
        if other.name == config.instance:
            continue
        try:
            theirs = load_config(instance=other.name)
        except CxrdError:
            continue  # a broken config starts nothing; its own start says why
        if theirs.install_path == config.install_path:
            continue  # the same dir: the install lock decides
        if other.config_path.exists():
            found.append((other, f"configured in {other.config_path}", ports_of(theirs)))
        held = _held(theirs.run_dir)
        if held:
            found.append((other, f"held by its runtime, see {theirs.run_dir / C.ENV_FILE}", held))
    return found


def _with_install_dirs() -> list[Instance]:
    """Instances without a config file whose default install dir exists."""
    default = Path(os.path.expanduser(C.DEFAULT_INSTALL_DIR))
    found = [Instance()] if default.is_dir() else []
    try:
        dirs = list(default.parent.glob(f"{default.name}-*"))
    except OSError:
        return found
    for path in dirs:
        instance = instances.for_install_dir(path)
        if instance.name and path.is_dir():
            found.append(instance)
    return found


def _held(run_dir: Path) -> dict[int, str]:
    try:
        if rundir.live_runtime_pid(run_dir) is None:
            return {}
        env = read_env_file(run_dir / C.ENV_FILE)
    except (OSError, ValueError, CxrdError):
        return {}
    held: dict[int, str] = {}
    for key, what in ((C.SERVER_PORT_ENV, "signaling port"), (C.MEDIA_PORT_ENV, "media port")):
        value = env.get(key, "")
        if value.isdigit():
            held[int(value)] = what
    return held
