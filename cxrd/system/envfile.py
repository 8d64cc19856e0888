"""``run/cloudxr.env``: the runtime's environment as ``export KEY=<quoted>`` lines.

The format is the one isaacteleop's ``EnvConfig`` writes: one
``export KEY=<shlex.quote(value)>`` line per variable, sorted by key, file mode
0600. Its ``read_exported_env()`` (and so ``CloudXRLauncher``) reads it line by
line, and a POSIX shell ``source``s it. A value holding a line break cannot
survive a line-by-line reader (worse, a crafted one could smuggle in another
``KEY=``), so such values are refused rather than written.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cxrd.core.model import ENV_NAME, check_env_value

_EXPORT = "export "


def format_env(env: Mapping[str, str]) -> str:
    """The file's text: ``export KEY=<quoted>`` lines sorted by key."""
    for key, value in env.items():
        check_env_value(key, value)
    return "".join(f"{_EXPORT}{key}={shlex.quote(env[key])}\n" for key in sorted(env))


def write_env_file(path: Path, env: Mapping[str, str]) -> None:
    """Replace ``path`` atomically with ``env``; the file is 0600 from its creation.

    Readers see the old file or the new one, never a partial one.
    """
    text = format_env(env)
    # mkstemp creates the file 0600 (O_EXCL) in the target's own directory.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_env_file(path: Path) -> dict[str, str]:
    """Read a file :func:`write_env_file` (or isaacteleop) wrote.

    Blank lines and ``#`` comments are skipped; ``export`` is optional. Raises
    :class:`OSError` when the file cannot be read and :class:`ValueError`,
    naming the line, for a line that is not ``KEY=<one shell word>``.
    """
    result: dict[str, str] = {}
    text = path.read_text(encoding="utf-8")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix(_EXPORT).partition("=")
        key = key.strip()
        if not sep or not ENV_NAME.match(key):
            raise ValueError(f"{path}:{number}: expected export KEY=value, got {raw!r}")
        try:
            words = shlex.split(value, comments=False, posix=True)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {key}: {exc}") from None
        if len(words) > 1:
            raise ValueError(f"{path}:{number}: {key}: value is more than one shell word")
        result[key] = words[0] if words else ""
    return result
