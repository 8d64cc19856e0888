"""The chaos soak's plan: which operations, with which variants, at what times. Pure.

The same seed, duration, rate and exclusions always give the same list
(``plan_digest`` names it in the report), so a failing soak can be replayed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass

MAX_OPS = 10_000
CONNECTIONS = 3  # the driver's bus connections; each op names the one that calls

GOOD_PROFILES = ("Quest3", "AppleVisionPro", "auto-webrtc")
BAD_PROFILES = ("Quest 3", "Quest3\n", "Quest\t3")  # whitespace never names a profile
# kind -> weight; the variants of each kind are drawn in plan().
WEIGHTS = {
    "status": 20,
    "start": 8,
    "start_bad": 4,
    "restart": 4,
    "restart_bad": 4,
    "acquire": 6,
    "release": 6,
    "leave_bus": 2,
    "reload": 5,
    "reload_bad": 3,
    "kill_runtime": 3,
    "kill_proxy": 3,
}
# Invalid reloads: the file as it would be with one bad edit.
BAD_RELOADS = (
    "max_connections_type",  # proxy.max_connections = "many"
    "max_connections_zero",  # proxy.max_connections = 0
    "reserved_env",  # runtime.env.XR_RUNTIME_JSON
    "env_newline",  # a runtime.env value with a line break
    "profile_space",  # runtime.device_profile = "Quest 3"
    "sim_negative",  # runtime.sim.startup_delay = -1
)


@dataclass(frozen=True)
class Op:
    at: float  # seconds after the soak began
    kind: str
    arg: str  # the variant: a profile, a reload edit, a lease index
    conn: int  # which of the driver's connections calls


def plan(seed: int, seconds: float, rate: float, without: Iterable[str] = ()) -> list[Op]:
    """The soak's operations; the same seed, duration, rate and exclusions give the same list."""
    rng = random.Random(seed)
    left = {k: w for k, w in WEIGHTS.items() if k not in set(without)}
    kinds, weights = list(left), list(left.values())
    ops: list[Op] = []
    at = 0.0
    while len(ops) < MAX_OPS:
        at += rng.expovariate(rate)
        if at >= seconds:
            break
        kind = rng.choices(kinds, weights)[0]
        arg = ""
        if kind in ("start", "restart"):
            arg = rng.choice(("", *GOOD_PROFILES))
        elif kind in ("start_bad", "restart_bad"):
            arg = rng.choice(BAD_PROFILES)
        elif kind == "release":
            arg = rng.choice(("unknown", str(rng.randrange(1000))))
        elif kind == "reload":
            arg = rng.choice((f"max_connections={rng.randint(8, 128)}", f"env={len(ops)}"))
        elif kind == "reload_bad":
            arg = rng.choice(BAD_RELOADS)
        ops.append(Op(round(at, 4), kind, arg, rng.randrange(CONNECTIONS)))
    return ops


def plan_digest(ops: list[Op]) -> str:
    text = "\n".join(f"{o.at}|{o.kind}|{o.arg}|{o.conn}" for o in ops)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def show(op: Op) -> str:
    return f"{op.at:.3f}s {op.kind}({op.arg!r})"
