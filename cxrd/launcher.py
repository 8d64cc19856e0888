"""isaacteleop's ``CloudXRLauncher`` shape, backed by cxrd. Switch with one import::

    from cxrd.launcher import CloudXRLauncher   # was: from isaacteleop.cloudxr import ...

    with CloudXRLauncher() as launcher:
        launcher.health_check()
        ...

Same constructor arguments, context manager, ``health_check()``, ``stop()``,
``wss_log_path``, ``run_dir``, ``env_file``, ``owns_runtime`` and the argparse
helpers. The difference is where the runtime lives: in cxrd, a per-user
service started on demand over D-Bus. The launcher holds a lease on it while
it is open (so ``stop_when_idle`` can stop it later) and adopts its
environment into ``os.environ`` so OpenXR resolves to it. ``run_embedded``
means "this process owns the runtime": the launcher stops cxrd on exit.

Failures are :class:`RuntimeError` (as isaacteleop raises), carrying the cxrd
error as ``__cause__``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from cxrd import constants as C
from cxrd import instances
from cxrd.client import CloudXRClient
from cxrd.config import load_config, parse_env_file, same_profile
from cxrd.core.choice import Choice
from cxrd.core.snapshot import Snapshot
from cxrd.core.states import State
from cxrd.dbus.leasing import Held
from cxrd.errors import ConfigMismatch, CxrdError, NotRunning, ProfileMismatch
from cxrd.instances import Instance

logger = logging.getLogger(__name__)

DEFAULT_DEVICE_PROFILE = C.DEFAULT_DEVICE_PROFILE


class LauncherError(RuntimeError):
    """What the launcher raises; ``__cause__`` is the cxrd error."""


def _runtime_error(err: CxrdError) -> LauncherError:
    return LauncherError(f"{err} ({err.hint})" if err.hint else str(err))


class NoopContext:
    """Stands in when no CloudXR runtime is wanted (``--no-launch-cloudxr-runtime``)."""

    @property
    def owns_runtime(self) -> bool:
        return False

    @property
    def wss_log_path(self) -> Path | None:
        return None

    def stop(self) -> None:
        pass

    def health_check(self) -> None:
        pass

    def __enter__(self) -> NoopContext:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def serving_instance(install_path: Path) -> Instance:
    """The instance whose install dir is ``install_path`` (``~/.cloudxr-left``: ``left``)."""
    dirs = {}
    for instance in instances.configured():
        try:
            dirs[instance] = load_config(instance=instance.name).install_path
        except CxrdError:
            continue
    return instances.for_install_dir(install_path, dirs)


class CloudXRLauncher:
    """Attach to (starting if needed) the CloudXR runtime cxrd serves."""

    def __init__(
        self,
        install_dir: str = "~/.cloudxr",
        env_config: str | Path | None = None,
        device_profile: str = DEFAULT_DEVICE_PROFILE,
        accept_eula: bool = False,
        setup_oob: bool = False,
        usb_local: bool = False,
        host_client: bool = False,
        run_embedded: bool = False,
        start_wss_proxy: bool | None = None,
        *,
        bus_address: str | None = None,
        timeout: float | None = None,
        instance: str | None = None,
    ) -> None:
        if start_wss_proxy is not None:
            message = "start_wss_proxy is deprecated and does nothing; cxrd always runs the proxy"
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            logger.warning(message)
        ignored = [
            name
            for name, given in (
                ("setup_oob", setup_oob),
                ("usb_local", usb_local),
                ("host_client", host_client),
            )
            if given
        ]
        if ignored:
            logger.warning(
                "%s: not applied; cxrd's proxy is configured in cxrd.toml", ", ".join(ignored)
            )
        self._install_path = Path(os.path.expanduser(install_dir)).absolute()
        self._owns = run_embedded
        self._pid = os.getpid()  # a child of fork() neither releases nor stops what is ours
        self._bus_address = bus_address
        self._closed = False
        self._lease: Held | None = None
        self._snapshot: Snapshot | None = None
        if accept_eula:
            from cxrd.system import eula

            if not eula.is_accepted(self._install_path):
                eula.accept(self._install_path)
        try:
            if instance is None:
                # The unnamed instance's dir: $CXRD_INSTANCE may still pick another.
                instance = serving_instance(self._install_path).name or None
            self._client = CloudXRClient(bus_address, instance=instance)
        except CxrdError as err:
            raise _runtime_error(err) from err
        try:
            self._attach(device_profile, env_config, timeout)
        except CxrdError as err:
            self._close_client()
            raise _runtime_error(err) from err
        except BaseException:
            self._close_client()
            raise

    def _attach(self, profile: str, env_config: str | Path | None, timeout: float | None) -> None:
        client = self._client
        if self._owns and client.is_running() and client.status().state is State.READY:
            raise LauncherError(
                "A CloudXR runtime is already served by cxrd, so run_embedded cannot own one. "
                "Stop it first (`cxrctl stop`), or construct the launcher without run_embedded."
            )
        requested = self._read_env_config(Path(env_config)) if env_config is not None else {}
        choice = self._choice(profile, requested)
        reason = f"CloudXRLauncher (pid {os.getpid()})"
        try:
            held = client.hold(
                reason, timeout=timeout, device_profile=choice.profile, env=choice.env,
                gpu=choice.gpu,
            )  # fmt: skip
        except (ProfileMismatch, ConfigMismatch) as err:
            # isaacteleop attaches to a live runtime whatever its env file says; so do we,
            # aloud: one line per key below, or this one without an env file.
            if env_config is None:
                logger.warning("%s; attaching to the running runtime as it is", err)
            held = client.hold(reason, timeout=timeout)
        self._lease = held
        assert held.snapshot is not None
        snap = held.snapshot
        self._snapshot = snap
        if not snap.environment:
            raise LauncherError(
                f"cxrd is ready but reports no runtime environment; see `cxrctl status` "
                f"({snap.env_file})"
            )
        os.environ.update(snap.environment)
        if Path(snap.install_dir) != self._install_path:
            logger.warning(
                "cxrd serves %s, not the requested %s (set install_dir in cxrd.toml)",
                snap.install_dir,
                self._install_path,
            )
        if env_config is not None:
            self._report_env_config(Path(env_config), requested, snap.environment)
        logger.info("Attached to the CloudXR runtime cxrd serves (pid %d)", snap.runtime.pid)

    @staticmethod
    def _choice(profile: str, requested: dict[str, str]) -> Choice:
        """What to ask cxrd for: the env file's keys and profile (it beats the constructor's,
        as in isaacteleop) and the GPU this process pinned (Isaac Lab sets
        NV_CXR_GPU_INDEX_CUDA in os.environ before it makes the launcher)."""
        values = {C.DEVICE_PROFILE_ENV: profile, **requested}
        if values[C.DEVICE_PROFILE_ENV] == DEFAULT_DEVICE_PROFILE:
            del values[C.DEVICE_PROFILE_ENV]  # the default: whatever cxrd is configured with
        if C.GPU_CUDA_ENV not in values and C.GPU_VULKAN_ENV not in values:
            pinned = os.environ.get(C.GPU_CUDA_ENV, "").strip()
            if pinned:
                values[C.GPU_CUDA_ENV] = pinned
        for key in (C.SERVER_PORT_ENV, C.MEDIA_PORT_ENV):
            values.pop(key, None)  # the daemon's ports; reported below when they differ
        return Choice.from_env(values)

    @staticmethod
    def _read_env_config(path: Path) -> dict[str, str]:
        try:
            return parse_env_file(path)
        except CxrdError as err:
            logger.warning("%s is ignored, and could not be read: %s", path, err)
            return {}

    @staticmethod
    def _report_env_config(path: Path, requested: dict[str, str], running: Any) -> None:
        """One line per key the running runtime has otherwise (as isaacteleop reports them).

        Only differing keys: passing the same file on every run is how this is
        scripted. Profiles compare as the runtime compares them (``quest3`` is
        ``Quest3``).
        """
        for key, value in sorted(requested.items()):
            have = running.get(key)
            if have == value or (
                key == C.DEVICE_PROFILE_ENV and have is not None and same_profile(have, value)
            ):
                continue
            logger.warning(
                "%s: %s=%s is not applied: the runtime in use has %s; "
                "`cxrctl restart --env-file %s` switches it",
                path,
                key,
                value,
                "(not set)" if have is None else have,
                path,
            )

    # what isaacteleop's launcher exposes

    @property
    def owns_runtime(self) -> bool:
        return self._owns

    @property
    def run_dir(self) -> Path:
        base = Path(self._snapshot.install_dir) if self._snapshot else self._install_path
        return base / C.RUN_DIR

    @property
    def env_file(self) -> Path:
        return Path(self._snapshot.env_file) if self._snapshot else self.run_dir / C.ENV_FILE

    @property
    def wss_log_path(self) -> Path | None:
        logs: dict[str, str] = {}
        with contextlib.suppress(CxrdError):
            logs = dict(self._status().logs)
        if "proxy" in logs:
            return Path(logs["proxy"])
        candidate = self.run_dir.parent / C.LOGS_DIR / C.PROXY_LOG
        return candidate if candidate.exists() else None

    def health_check(self) -> None:
        """Raise :class:`RuntimeError` unless the runtime is serving right now."""
        try:
            snap = self._status()
        except NotRunning as err:
            raise LauncherError(f"The CloudXR runtime serving {self.run_dir} has stopped") from err
        except CxrdError as err:
            raise _runtime_error(err) from err
        if snap.state is not State.READY:
            detail = f": {snap.last_error}" if snap.last_error else ""
            raise LauncherError(f"The CloudXR runtime is {snap.state}{detail}")

    def stop(self) -> None:
        """Release this process's hold; stop cxrd too if this process owns the runtime.

        In the child of a fork, the hold and the runtime stay the parent's: this
        only closes the child's connection (see :class:`cxrd.client.CloudXRClient`).
        """
        try:
            if self._lease is not None:
                lease, self._lease = self._lease, None
                with contextlib.suppress(CxrdError):  # gone with the daemon already
                    self._client.let_go(lease)
            if self._owns and os.getpid() == self._pid:
                self._owns = False
                try:
                    self._client.stop()
                except CxrdError as err:
                    raise _runtime_error(err) from err
        finally:
            self._close_client()

    def _close_client(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None and not self._closed:
            self._closed = True
            client.close()

    def _status(self) -> Snapshot:
        if not self._closed:
            return self._client.status()
        with CloudXRClient(self._bus_address) as client:  # after stop(): ask afresh
            return client.status()

    def __enter__(self) -> CloudXRLauncher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # argparse helpers, same flags as isaacteleop's

    @staticmethod
    def add_cloudxr_install_dir_argument(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--cloudxr-install-dir",
            default=os.path.expanduser("~/.cloudxr"),
            metavar="PATH",
            help="CloudXR install directory (default: ~/.cloudxr)",
        )

    @staticmethod
    def add_launch_cloudxr_runtime_argument(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--launch-cloudxr-runtime",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="attach to (or start) the CloudXR runtime cxrd serves (default: true)",
        )

    @staticmethod
    def add_cloudxr_device_profile_argument(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--cloudxr-device-profile",
            default=DEFAULT_DEVICE_PROFILE,
            metavar="PROFILE",
            help=f"NV_DEVICE_PROFILE for the runtime (default: {DEFAULT_DEVICE_PROFILE})",
        )

    @staticmethod
    def add_cloudxr_env_config_argument(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--cloudxr-env-config",
            default=None,
            metavar="PATH",
            help="KEY=value env file of runtime overrides (reported, not applied, when attaching)",
        )

    @staticmethod
    def add_accept_eula_argument(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--accept-eula", action="store_true", help="accept the NVIDIA CloudXR EULA"
        )

    @staticmethod
    def add_launch_wss_proxy_argument(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--launch-wss-proxy",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="deprecated no-op: the proxy always runs with the runtime",
        )

    @staticmethod
    def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
        CloudXRLauncher.add_cloudxr_install_dir_argument(parser)
        CloudXRLauncher.add_cloudxr_device_profile_argument(parser)
        CloudXRLauncher.add_cloudxr_env_config_argument(parser)
        CloudXRLauncher.add_accept_eula_argument(parser)
        CloudXRLauncher.add_launch_cloudxr_runtime_argument(parser)
        CloudXRLauncher.add_launch_wss_proxy_argument(parser)

    @staticmethod
    def launch_context(
        args: argparse.Namespace,
        *,
        install_dir: str | None = None,
        env_config: str | Path | None = None,
        device_profile: str | None = None,
        accept_eula: bool | None = None,
        setup_oob: bool = False,
        usb_local: bool = False,
        host_client: bool = False,
        run_embedded: bool = False,
        start_wss_proxy: bool | None = None,
    ) -> CloudXRLauncher | NoopContext:
        """A launcher from parsed arguments, or a no-op with --no-launch-cloudxr-runtime."""
        if not getattr(args, "launch_cloudxr_runtime", True):
            return NoopContext()
        if start_wss_proxy is None:
            start_wss_proxy = getattr(args, "launch_wss_proxy", None)
        return CloudXRLauncher(
            install_dir=str(install_dir or getattr(args, "cloudxr_install_dir", "~/.cloudxr")),
            env_config=env_config or getattr(args, "cloudxr_env_config", None),
            device_profile=str(
                device_profile or getattr(args, "cloudxr_device_profile", DEFAULT_DEVICE_PROFILE)
            ),
            accept_eula=bool(
                accept_eula if accept_eula is not None else getattr(args, "accept_eula", False)
            ),
            setup_oob=setup_oob,
            usb_local=usb_local,
            host_client=host_client,
            run_embedded=run_embedded,
            start_wss_proxy=start_wss_proxy,
        )
