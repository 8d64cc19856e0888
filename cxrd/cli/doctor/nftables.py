"""Would this nftables ruleset drop a headset's first packet to a port? (pure: JSON in, answer out)

The packet asked about is a new IPv4 connection (or UDP flow) from another
machine: not loopback, connection-tracking state ``new``, source unknown. A
rule whose match cannot be decided for such a packet (a source address, a
named set, an interface name other than ``lo``) is read in the headset's
favour: its accept counts, its drop does not. Doctor must not cry wolf over a
rule it cannot read; a drop it is sure of is a drop.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Port = tuple[int, str]  # (number, "tcp" | "udp")

_FAMILIES = ("inet", "ip")  # the tables an IPv4 packet passes through at the input hook
_MAX_DEPTH = 16  # nft itself refuses deeper jump chains
_ORDER = {"<": operator.lt, ">": operator.gt, "<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Chain:
    """A base chain at the input hook, as ``nft`` names it."""

    family: str
    table: str
    name: str

    def __str__(self) -> str:
        return f"{self.family} {self.table} {self.name}"

    def insert_accept(self, ports: Sequence[Port]) -> str:
        """The command that lets ``ports`` through this chain, ahead of any drop in it."""
        commands = []
        for proto in ("tcp", "udp"):
            numbers = [str(number) for number, p in ports if p == proto]
            if not numbers:
                continue
            match = numbers[0] if len(numbers) == 1 else "{ " + ", ".join(numbers) + " }"
            rule = f"insert rule {self} {proto} dport {match} accept"
            commands.append(f"sudo nft '{rule}'")
        return " && ".join(commands)


def _port_matches(right: Any, number: int) -> bool | None:
    if isinstance(right, int):
        return right == number
    if isinstance(right, Mapping) and "range" in right:
        low, high = right["range"]
        return bool(low <= number <= high)
    if isinstance(right, Mapping) and "set" in right:
        answers = [_port_matches(item, number) for item in right["set"]]
        return True if True in answers else (None if None in answers else False)
    return None  # a named set (@name), a map, a symbolic service name


def _word_matches(right: Any, word: str) -> bool | None:
    if isinstance(right, str):
        return None if right.startswith("@") else right == word
    if isinstance(right, Mapping) and "set" in right:
        right = right["set"]
    if isinstance(right, list) and all(isinstance(item, str) for item in right):
        return word in right
    return None


def _compare(op: str, found: bool | None) -> bool | None:
    if found is None or op in ("==", "in"):
        return found
    if op == "!=":
        return not found
    return None


def _match(expr: Mapping[str, Any], port: Port) -> bool | None:
    number, proto = port
    op, left, right = expr.get("op", "=="), expr.get("left"), expr.get("right")
    if not isinstance(left, Mapping):
        return None
    if "payload" in left:
        payload = left["payload"]
        if payload.get("protocol") == "ip6":
            return False  # the packet is IPv4
        if payload.get("field") != "dport" or payload.get("protocol") not in ("tcp", "udp", "th"):
            return None
        if payload["protocol"] not in (proto, "th"):
            return False  # `tcp dport ...` implies the protocol, whatever the operator
        if op in _ORDER and isinstance(right, int):
            return bool(_ORDER[op](number, right))
        return _compare(op, _port_matches(right, number))
    if left.get("ct") == {"key": "state"}:  # a bitmask: `in` and `==` both mean "one of these"
        return _compare(op, _word_matches(right if isinstance(right, list) else [right], "new"))
    key = left.get("meta", {}).get("key")
    if key == "l4proto":
        return _compare(op, _word_matches(right, proto))
    if key in ("iif", "iifname") and right == "lo":
        return _compare(op, False)
    return None


def _verdict(expr: Mapping[str, Any], port: Port) -> tuple[str, str] | None:
    """(verdict, jump target) of one statement, or None for a statement that is no verdict."""
    for word in ("accept", "drop", "return"):
        if word in expr:
            return word, ""
    if "reject" in expr:
        return "drop", ""
    for word in ("jump", "goto"):
        if word in expr:
            return word, str(expr[word]["target"])
    if "vmap" in expr:
        key = {"op": "==", "left": expr["vmap"]["key"]}
        for value, verdict in expr["vmap"]["data"].get("set", []):
            if _match({**key, "right": value}, port):
                return _verdict(verdict, port)
    return None


def _walk(
    rules: Mapping[str, list[list[Any]]], chain: str, port: Port, sure: bool, depth: int
) -> str | None:
    """accept, drop, or None when the packet falls off the end of ``chain`` (or returns)."""
    if depth > _MAX_DEPTH:
        return None
    for exprs in rules.get(chain, []):
        answers = [_match(e["match"], port) for e in exprs if "match" in e]
        if False in answers:
            continue
        certain = sure and None not in answers
        verdicts = [v for e in exprs if "match" not in e and (v := _verdict(e, port)) is not None]
        if not verdicts:
            continue
        word, target = verdicts[0]
        if word == "accept":
            return "accept"
        if word == "drop" and certain:
            return "drop"
        if word == "return" and certain:
            return None
        if word in ("jump", "goto"):
            inner = _walk(rules, target, port, certain, depth + 1)
            if inner is not None or (word == "goto" and certain):
                return inner
    return None


def blocking_chain(ruleset: Mapping[str, Any], port: Port) -> Chain | None:
    """The first input base chain that is sure to drop a headset's packet to ``port``."""
    items = ruleset.get("nftables", [])
    rules: dict[tuple[str, str], dict[str, list[list[Any]]]] = {}
    for item in items:
        if "rule" in item:
            rule = item["rule"]
            table = rules.setdefault((rule["family"], rule["table"]), {})
            table.setdefault(rule["chain"], []).append(rule.get("expr", []))
    for item in items:
        chain = item.get("chain", {})
        if chain.get("hook") != "input" or chain.get("family") not in _FAMILIES:
            continue
        table_rules = rules.get((chain["family"], chain["table"]), {})
        verdict = _walk(table_rules, chain["name"], port, True, 0)
        if verdict == "drop" or (verdict is None and chain.get("policy") == "drop"):
            return Chain(chain["family"], chain["table"], chain["name"])
    return None
