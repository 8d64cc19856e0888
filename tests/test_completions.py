"""Completions: `cxrctl install` puts them where each real shell finds them on its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import TIMEOUT

CXRCTL = str(Path(sys.executable).parent / "cxrctl")
SUBCOMMANDS = {"status", "start", "stop", "restart", "wait", "env", "logs", "install", "doctor"}
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")

# Load the completion bash-completion finds for $1 (as on the first TAB), then ask it
# what completes the last word of "$@" (as TAB there would).
BASH_QUERY = r"""
. /usr/share/bash-completion/bash_completion
__load_completion "$1" || exit 3
spec=$(complete -p "$1") || exit 4
func=${spec##*-F }; func=${func%% *}
COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
"$func" "$1" "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def bash_completes(env: dict[str, str], *words: str) -> set[str]:
    return set(run(["bash", "-c", BASH_QUERY, "bash", *words], env).split())


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """A user with cxrctl on PATH, nothing installed, and no bus (install only notes the reload)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DBUS_SESSION_BUS_ADDRESS",)}
    env.update(
        PATH=f"{Path(CXRCTL).parent}:{os.environ.get('PATH', os.defpath)}",
        HOME=str(tmp_path / "home"),
        XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"),
        XDG_DATA_HOME=str(tmp_path / "home" / ".local" / "share"),
        XDG_RUNTIME_DIR=str(tmp_path / "no-runtime-dir"),
    )
    env.pop("BASH_COMPLETION_USER_DIR", None)
    (tmp_path / "home").mkdir()
    return env


def run(argv: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=TIMEOUT * 3, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.skipif(not BASH_COMPLETION.is_file(), reason="bash-completion is not installed")
def test_bash_completes_subcommands_and_flags_after_cxrctl_install(home: dict[str, str]) -> None:
    run([CXRCTL, "install"], home)
    assert bash_completes(home, "cxrctl", "") >= SUBCOMMANDS
    assert bash_completes(home, "cxrctl", "logs", "--f") == {"--follow"}
    assert bash_completes(home, "cxrd", "--runtime", "") == {"isaacteleop", "sim", "command"}


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_subcommands_after_cxrctl_install(home: dict[str, str]) -> None:
    run([CXRCTL, "install"], home)
    lines = run(["fish", "-c", "complete -C 'cxrctl '"], home).splitlines()
    assert {line.split("\t")[0] for line in lines} >= SUBCOMMANDS
    lines = run(["fish", "-c", "complete -C 'cxrd --'"], home).splitlines()
    assert "--install-dir" in {line.split("\t")[0] for line in lines}


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_compinit_registers_them_from_the_directory_install_names(
    home: dict[str, str], tmp_path: Path
) -> None:
    out = run([CXRCTL, "install"], {**home, "SHELL": "/bin/zsh"})
    site = Path(home["XDG_DATA_HOME"]) / "zsh" / "site-functions"
    assert f"fpath+=({site})" in out, "install says the one line zsh needs"
    script = (
        f"fpath+=({site}); autoload -Uz compinit; compinit -u -d {tmp_path}/zcompdump; "
        "print -r -- $_comps[cxrctl] $_comps[cxrd]"
    )
    assert run(["zsh", "-f", "-c", script], home).split() == ["_cxrctl", "_cxrd"]


def test_uninstall_removes_every_completion_file(home: dict[str, str]) -> None:
    run([CXRCTL, "install"], home)
    written = {p for p in Path(home["HOME"]).rglob("*") if p.is_file()}
    assert {p.name for p in written} >= {"cxrctl", "_cxrctl", "cxrctl.fish", "cxrd.fish"}
    run([CXRCTL, "uninstall"], home)
    assert not [p for p in Path(home["HOME"]).rglob("*") if p.is_file()]
