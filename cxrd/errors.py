"""One exception tree; each class is one D-Bus error name and one exit code.

The daemon exits with ``exit_code`` when the error ends it, the D-Bus adapter
replies with ``dbus_name``, and ``cxrctl`` exits with ``exit_code`` after
printing ``str(error)`` and ``hint``. The client maps names back to classes.
"""

from __future__ import annotations

from typing import ClassVar

from cxrd.constants import ERROR_PREFIX


class CxrdError(Exception):
    """Base of every error cxrd reports to a person or a program."""

    name: ClassVar[str] = "Failed"
    exit_code: ClassVar[int] = 1
    hint: ClassVar[str] = ""

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        # Longer evidence (a log tail) for cxrd.last_error; never on the wire.
        self.detail = detail

    @classmethod
    def dbus_name(cls) -> str:
        return ERROR_PREFIX + cls.name


class StartFailed(CxrdError):
    """The runtime or the proxy could not be brought up."""

    name = "StartFailed"
    exit_code = 10
    hint = "see `cxrctl status` and `cxrctl logs --runtime`"


class Timeout(CxrdError):
    name = "Timeout"
    exit_code = 11
    hint = "raise runtime.startup_timeout, or pass --timeout"


class RuntimeUnavailable(CxrdError):
    name = "RuntimeUnavailable"
    exit_code = 12
    hint = "pip install 'cxrd[cloudxr]' (the isaacteleop wheel), or set runtime.backend"


class EulaNotAccepted(CxrdError):
    name = "EulaNotAccepted"
    exit_code = 13
    hint = "read the NVIDIA CloudXR EULA, then run `cxrctl accept-eula`"


class AlreadyServing(CxrdError):
    name = "AlreadyServing"
    exit_code = 14
    hint = "stop the other runtime or cxrd first, or use another install_dir"


class InvalidConfig(CxrdError):
    name = "InvalidConfig"
    exit_code = 15
    hint = "fix the file and key named above"


class GaveUp(CxrdError):
    """The runtime crashed too often in the restart window; systemd must not loop."""

    name = "GaveUp"
    exit_code = 16
    hint = "see `cxrctl status` for the last error, then `cxrctl start`"


class ProfileMismatch(CxrdError):
    name = "ProfileMismatch"
    exit_code = 17
    hint = "`cxrctl restart --profile P` switches the running runtime's profile"


class ConfigMismatch(CxrdError):
    """A Start asks for other env or GPU settings than the runtime in use runs with."""

    name = "ConfigMismatch"
    exit_code = 22
    hint = "`cxrctl restart --env-file FILE --gpu N --profile P` switches the running runtime"


class Busy(CxrdError):
    name = "Busy"
    exit_code = 18
    hint = "wait for the daemon to finish what it is doing, then try again"


class InvalidArgs(CxrdError):
    name = "InvalidArgs"
    exit_code = 19


class AccessDenied(CxrdError):
    name = "AccessDenied"
    exit_code = 20
    hint = "call as the user that runs cxrd"


class NoSuchLease(CxrdError):
    name = "NoSuchLease"
    exit_code = 21


class NotRunning(CxrdError):
    """Client side only: the bus name has no owner and auto-start was not asked for."""

    name = "NotRunning"
    exit_code = 3
    hint = "`cxrctl start` or `systemctl --user start cloudxr`"


ALL_ERRORS: tuple[type[CxrdError], ...] = (
    CxrdError,
    StartFailed,
    Timeout,
    RuntimeUnavailable,
    EulaNotAccepted,
    AlreadyServing,
    InvalidConfig,
    GaveUp,
    ProfileMismatch,
    ConfigMismatch,
    Busy,
    InvalidArgs,
    AccessDenied,
    NoSuchLease,
    NotRunning,
)


def error_for_dbus_name(name: str) -> type[CxrdError] | None:
    for cls in ALL_ERRORS:
        if cls.dbus_name() == name:
            return cls
    return None
