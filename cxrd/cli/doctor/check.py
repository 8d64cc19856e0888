"""What a check of ``cxrctl doctor`` says, and how long it may take to find out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Level = Literal["ok", "warn", "fail"]

TIMEOUT = 5.0  # seconds for one question to the bus, systemctl, loginctl or ldconfig


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    message: str
    fix: str = ""
