"""Instances: several cxrd daemons for one user, one name each. The one home of their names.

The unnamed instance is what cxrd always was: ``cloudxr.service``,
``~/.config/cxrd/cxrd.toml``, ``~/.cloudxr`` and the bus name
``io.github.cxrd.Daemon1``. A named instance ``NAME`` (``[a-z][a-z0-9_]{0,31}``)
is ``cloudxr@NAME.service``, ``~/.config/cxrd/NAME.toml``, ``~/.cloudxr-NAME``
and ``io.github.cxrd.Daemon1.NAME``, with the same object path and interface.
The daemon, the client, the CLI, ``cxrctl install`` and the launcher all take
their names from here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cxrd import constants as C
from cxrd.errors import InvalidArgs

ENV_VAR: Final = "CXRD_INSTANCE"  # cxrctl and the client library read it
NAME_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
# ~/.config/cxrd/cxrd.toml is the unnamed instance's file, so "cxrd" names nothing.
RESERVED: Final = frozenset({"cxrd"})
_CONFIG_SUFFIX: Final = ".toml"


def check_name(name: str) -> str:
    """``name`` if it can name an instance; InvalidArgs naming it if not."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgs(
            f"instance name {name!r}: expected a lower-case letter, then up to 31 "
            "lower-case letters, digits or underscores"
        )
    if name in RESERVED:
        raise InvalidArgs(f"instance name {name!r}: reserved (cxrd.toml is the unnamed instance's)")
    return name


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/cxrd`` (``~/.config/cxrd``): every instance's config file."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "cxrd"


@dataclass(frozen=True, order=True)
class Instance:
    """One instance's names; ``name`` "" is the unnamed one. Construct with :meth:`of`."""

    name: str = ""

    @classmethod
    def of(cls, name: str | None) -> Instance:
        """The instance ``name`` names (None or "": the unnamed one); InvalidArgs if invalid."""
        return cls(check_name(name) if name else "")

    @classmethod
    def selected(cls, name: str | None = None) -> Instance:
        """``name`` if given, else ``$CXRD_INSTANCE``, else the unnamed instance."""
        if name is None:
            name = os.environ.get(ENV_VAR, "")
        return cls.of(name)

    @property
    def label(self) -> str:
        """How a person reads it: the name, or "default"."""
        return self.name or "default"

    @property
    def bus_name(self) -> str:
        return f"{C.BUS_NAME}.{self.name}" if self.name else C.BUS_NAME

    @property
    def unit(self) -> str:
        stem = C.UNIT_TEMPLATE.removesuffix(".service")
        return f"{stem}{self.name}.service" if self.name else C.UNIT_NAME

    @property
    def activation_file(self) -> str:
        """The D-Bus service file that activates it: ``<bus name>.service``."""
        return f"{self.bus_name}.service"

    @property
    def config_path(self) -> Path:
        return config_dir() / f"{self.name or 'cxrd'}{_CONFIG_SUFFIX}"

    @property
    def default_install_dir(self) -> str:
        return f"{C.DEFAULT_INSTALL_DIR}-{self.name}" if self.name else C.DEFAULT_INSTALL_DIR

    @property
    def daemon_args(self) -> tuple[str, ...]:
        """What ``cxrd`` is given to be this instance."""
        return ("--instance", self.name) if self.name else ()


def configured() -> list[Instance]:
    """Every instance with a config file: the unnamed one first, then by name."""
    try:
        files = sorted(config_dir().glob(f"*{_CONFIG_SUFFIX}"))
    except OSError:
        return []
    found = []
    for path in files:
        stem = path.stem
        if stem == "cxrd":
            found.append(Instance())
        elif NAME_PATTERN.fullmatch(stem):
            found.append(Instance(stem))
    return sorted(found)


def from_bus_name(bus_name: str) -> Instance | None:
    """The instance a well-known bus name belongs to, or None for any other name."""
    if bus_name == C.BUS_NAME:
        return Instance()
    name = bus_name.removeprefix(f"{C.BUS_NAME}.")
    if name != bus_name and NAME_PATTERN.fullmatch(name) and name not in RESERVED:
        return Instance(name)
    return None


def for_install_dir(path: Path, install_dirs: dict[Instance, Path] | None = None) -> Instance:
    """The instance serving ``path``: one whose config names it, else by its name.

    ``install_dirs`` maps configured instances to their install dirs (from
    their config files); a dir no config names is matched by the default
    layout (``~/.cloudxr-left`` is ``left``), and anything else is the
    unnamed instance's.
    """
    path = Path(os.path.expanduser(path)).absolute()
    for instance, where in sorted((install_dirs or {}).items()):
        if where == path:
            return instance
    home_default = Path(os.path.expanduser(C.DEFAULT_INSTALL_DIR)).absolute()
    if path.parent == home_default.parent:
        prefix = f"{home_default.name}-"
        name = path.name.removeprefix(prefix)
        if name != path.name and NAME_PATTERN.fullmatch(name) and name not in RESERVED:
            return Instance(name)
    return Instance()
