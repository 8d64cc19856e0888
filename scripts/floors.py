"""Print pip constraints pinning every direct dependency at its declared floor.

Reads ``[project] dependencies`` (and, with ``--extra NAME``, that extra) from
pyproject.toml, so the floors tested are exactly the ones declared: each
``name>=X`` becomes ``name==X``. A dependency with no ``>=`` floor is an error,
as is one whose floor is not an exact release (``>=1.*`` means nothing here).
Usage: python scripts/floors.py [--extra cloudxr] > floors.txt
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def floors(pyproject: dict[str, object], extras: list[str]) -> list[str]:
    project = pyproject["project"]
    assert isinstance(project, dict)
    texts = list(project["dependencies"])
    for extra in extras:
        texts += project["optional-dependencies"][extra]
    lines = []
    for text in texts:
        requirement = Requirement(text)
        lows = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(lows) != 1:
            raise SystemExit(f"floors: {text!r} needs exactly one >= floor")
        lines.append(f"{requirement.name}=={lows[0]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="also pin this extra")
    args = parser.parse_args()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    sys.stdout.write("".join(f"{line}\n" for line in floors(pyproject, args.extra)))


if __name__ == "__main__":
    main()
