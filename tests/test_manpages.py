"""cxrctl(1), cxrd(8), cxrd.toml(5): generated, lint-clean, and naming every command and key."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support import TIMEOUT

from cxrd.cli.completions import parsers
from cxrd.cli.manpages import pages
from cxrd.config import Config


@pytest.fixture(scope="module")
def mandir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("man")
    for relative, text in pages().items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def render(page: Path) -> str:
    """What `man -l` shows, plain; man --warnings' complaints fail the test."""
    result = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert result.stderr == "", result.stderr
    return result.stdout


def all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        if not f.compare:
            continue
        if dataclasses.is_dataclass(default):
            keys += all_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


@pytest.mark.skipif(shutil.which("mandoc") is None, reason="mandoc is not installed")
def test_every_page_is_lint_clean(mandir: Path) -> None:
    for page in sorted(mandir.glob("man*/*")):
        lint = subprocess.run(
            ["mandoc", "-T", "lint", "-W", "warning", str(page)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), page


def test_cxrctl_page_shows_every_subcommand_and_flag(mandir: Path) -> None:
    text = render(mandir / "man1" / "cxrctl.1")
    assert text.startswith("CXRCTL(1)")
    sub = next(a for a in parsers()["cxrctl"]()._actions if a.choices and a.dest == "command")
    assert isinstance(sub.choices, dict)
    for name, parser in sub.choices.items():
        assert f"cxrctl {name}" in text
        for action in parser._actions:
            for flag in set(action.option_strings) - {"-h", "--help"}:
                assert flag in text, (name, flag)


def test_cxrd_page_is_section_8_with_every_flag(mandir: Path) -> None:
    text = render(mandir / "man8" / "cxrd.8")
    assert text.startswith("CXRD(8)")
    assert "cxrd - Run the NVIDIA CloudXR runtime" in text
    for action in parsers()["cxrd"]()._actions:
        for flag in set(action.option_strings) - {"-h", "--help"}:
            assert flag in text, flag


def test_config_page_has_every_key_of_the_schema_with_its_default(mandir: Path) -> None:
    text = render(mandir / "man5" / "cxrd.toml.5")
    assert text.startswith("CXRD.TOML(5)")
    for dotted in all_keys(Config):
        table, _, key = dotted.rpartition(".")
        if table:
            assert f"[{table}]" in text, table
        assert f"{key} = " in text, dotted
    assert "backend = string\n" in text.replace("       ", "")
    assert 'default: "Quest3"' in text
