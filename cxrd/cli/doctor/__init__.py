"""``cxrctl doctor``: what stands between this user and a running CloudXR, and the fix.

Each check looks at the real thing (the bus, the user manager, the unit it
loaded, the driver libraries the linker would find, the port's holder, the
certificate's dates) and says ok, warn or fail with the command that fixes it.
Checks never start the daemon (bus calls carry NO_AUTOSTART) and never change
anything. One broken check is reported as a failure of that check; the others
still run.
"""

from __future__ import annotations

from collections.abc import Callable

from cxrd.cli.doctor.bus import check_activation, check_session_bus, probe_bus
from cxrd.cli.doctor.check import Check
from cxrd.cli.doctor.envfile import check_env_file
from cxrd.cli.doctor.firewall import check_firewall
from cxrd.cli.doctor.gpus import check_gpus
from cxrd.cli.doctor.network import check_certificate, check_port, check_web_client
from cxrd.cli.doctor.runtime import (
    check_driver_libs,
    check_eula,
    check_gpu,
    check_run_dir,
    check_runtime_package,
)
from cxrd.cli.doctor.systemd import check_lingering, check_unit, check_user_manager
from cxrd.config import Config
from cxrd.instances import Instance


def run_checks(config: Config) -> list[Check]:
    """Every check, in the order a person would fix them."""
    instance = Instance(config.instance)
    bus = probe_bus(instance.bus_name)
    checks: list[Callable[[], Check]] = [
        lambda: check_session_bus(bus),
        check_user_manager,
        lambda: check_unit(instance.unit),
        lambda: check_activation(bus),
        lambda: check_runtime_package(config),
        lambda: check_eula(config),
        lambda: check_driver_libs(config),
        lambda: check_gpu(config),
        lambda: check_gpus(config),
        lambda: check_port(config, "proxy port", config.proxy.port, "proxy.port", bus),
        lambda: check_port(
            config, "runtime port", config.runtime.signaling_port, "runtime.signaling_port", bus
        ),
        lambda: check_firewall(config),
        lambda: check_certificate(config),
        lambda: check_web_client(config),
        lambda: check_run_dir(config),
        lambda: check_env_file(bus),
        check_lingering,
    ]
    results = []
    for check in checks:
        try:
            results.append(check())
        except Exception as exc:  # a diagnostic must report, not crash
            name = getattr(check, "__name__", "check").removeprefix("check_")
            results.append(Check(name, "fail", f"the check itself failed: {exc!r}", ""))
    return results


__all__ = ["Check", "run_checks"]
