"""run/cloudxr.env: read back by isaacteleop's own reader and by a POSIX shell."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support import TIMEOUT, exported_env_reader

from cxrd.system.envfile import format_env, read_env_file, write_env_file

pytest.importorskip("isaacteleop.cloudxr.env_config")

AWKWARD = {
    "PLAIN": "Quest3",
    "SPACES": "  two  spaces  ",
    "SINGLE": "it's",
    "DOUBLE": 'say "hi"',
    "DOLLAR": "$HOME and ${PATH} and $(id) and `id`",
    "BACKSLASH": "C:\\path\\n",
    "SHELLY": "a;b|c&d>e<f*g?h[i]~j#k!",
    "EQUALS": "k=v=w",
    "EMPTY": "",
    "DASH": "-n",
    "UNICODE": "naïve ☃",
    "TAB": "a\tb",
}


def shell_values(path: Path, keys: list[str]) -> dict[str, str]:
    """What ``sh`` sees after ``. path``, printed NUL-separated in a clean environment."""
    script = '. "$1"; shift; for k do eval "printf \'%s\\0\' \\"\\$$k\\""; done'
    out = subprocess.run(
        ["sh", "-c", script, "sh", str(path), *keys],
        env={"PATH": os.defpath},
        capture_output=True,
        check=True,
        timeout=TIMEOUT,
    ).stdout
    return dict(zip(keys, out.decode().split("\0")[:-1], strict=True))


def test_awkward_values_round_trip_through_isaacteleop_reader(tmp_path: Path) -> None:
    path = tmp_path / "cloudxr.env"
    write_env_file(path, AWKWARD)
    assert exported_env_reader()(path) == AWKWARD
    assert read_env_file(path) == AWKWARD


def test_awkward_values_round_trip_through_a_posix_shell(tmp_path: Path) -> None:
    path = tmp_path / "cloudxr.env"
    write_env_file(path, AWKWARD)
    assert shell_values(path, sorted(AWKWARD)) == AWKWARD


def test_lines_are_sorted_export_statements(tmp_path: Path) -> None:
    path = tmp_path / "cloudxr.env"
    write_env_file(path, {"ZED": "z", "ALPHA": "a b", "MID": "it's"})
    assert path.read_text() == ("export ALPHA='a b'\nexport MID='it'\"'\"'s'\nexport ZED=z\n")


def test_file_is_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    path = tmp_path / "cloudxr.env"
    path.write_text("export OLD=1\n")
    path.chmod(0o644)
    old = os.umask(0)
    try:
        write_env_file(path, {"NEW": "2"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_env_file(path) == {"NEW": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloudxr.env"], "no temp file left"


@pytest.mark.parametrize("value", ["two\nlines", "carriage\rreturn", "sep\u2028arator"])
def test_line_breaks_are_refused_and_the_old_file_is_kept(tmp_path: Path, value: str) -> None:
    # isaacteleop's reader goes line by line: such a value would come back cut,
    # or smuggle in another KEY= line.
    path = tmp_path / "cloudxr.env"
    write_env_file(path, {"KEEP": "me"})
    with pytest.raises(ValueError, match="BAD: value contains a line break"):
        write_env_file(path, {"BAD": value, "KEEP": "new"})
    assert read_env_file(path) == {"KEEP": "me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloudxr.env"]


def test_reads_the_file_isaacteleop_writes(tmp_path: Path) -> None:
    install = tmp_path / "cloudxr"
    code = (
        "import sys\n"
        "from isaacteleop.cloudxr.env_config import EnvConfig\n"
        "cfg = EnvConfig.from_args(sys.argv[1], launcher_defaults={'NV_DEVICE_PROFILE': 'x y'})\n"
        "print(cfg.env_filepath())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NV_", "XR", "CXR"))}
    out = subprocess.run(
        [sys.executable, "-c", code, str(install)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT * 3,
    ).stdout
    path = Path(out.strip().splitlines()[-1])
    ours = read_env_file(path)
    assert ours["NV_DEVICE_PROFILE"] == "x y"
    assert format_env(ours) == path.read_text(), "the same bytes for the same environment"


def test_reading_a_malformed_line_names_it(tmp_path: Path) -> None:
    path = tmp_path / "cloudxr.env"
    path.write_text("export GOOD=1\nexport BAD='unclosed\n")
    with pytest.raises(ValueError, match=r"cloudxr.env:2: BAD"):
        read_env_file(path)
