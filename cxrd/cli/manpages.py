"""Man pages: cxrctl(1) and cxrd(8) from their argparse parsers, cxrd.toml(5) from the schema.

The parsers go through argparse-manpage; cxrd.toml(5) walks the dataclasses of
:mod:`cxrd.config`, so a new flag or key is in the page without a second edit.
``python -m cxrd.cli.manpages MANDIR`` writes ``MANDIR/man1/cxrctl.1`` and the
others (packaging/build-deb.sh); argparse-manpage is needed only then.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import typing
from pathlib import Path

from cxrd import __version__
from cxrd.config import Config

MANUAL = "cxrd manual"
_SEE_ALSO = "cxrctl(1), cxrd(8), cxrd.toml(5), systemctl(1)"


def _date() -> str:
    """The pages' date, reproducible under SOURCE_DATE_EPOCH, in a form mandoc parses."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch else None
    day = when.date() if when else datetime.date.today()
    return f"{day:%B} {day.day}, {day.year}"


def _roff(text: str) -> str:
    """Text as roff takes it: backslashes and leading dots or quotes escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(f"\\&{line}" if line[:1] in ".'" else line for line in text.splitlines())


def _parser_page(prog: str, section: int) -> str:
    from argparse_manpage.manpage import Manpage

    from cxrd.cli.completions import parsers

    parser = parsers()[prog]()
    page = Manpage(parser)
    page.description = (parser.description or "").rstrip(".")  # the NAME line
    page.section = section
    page.manual = MANUAL
    page.source = f"cxrd {__version__}"
    page.date = _date()
    return f"{page}\n.SH SEE ALSO\n{_roff(_SEE_ALSO)}\n"


def _toml_type(hint: object) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return "array of strings"
    if origin is not None and not isinstance(hint, type) and args and len(args) == 1:
        return _toml_type(args[0])  # X | None
    if origin is not None:
        return "table of strings"
    names: dict[object, str] = {bool: "boolean", int: "integer", float: "float", str: "string"}
    return names.get(hint, str(hint))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}"
    return str(value)


def _table(cls: type, instance: object, name: str) -> list[str]:
    """The keys of one table, then its sub-tables, as .TP entries."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    tables: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.compare:  # bookkeeping such as Config.source, not a key
            continue
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            tables += _table(type(value), value, f"{name}.{f.name}" if name else f.name)
            continue
        default = "unset" if value is None else _toml_value(value)
        keys += [".TP", f"\\fB{_roff(f.name)}\\fR = \\fI{_roff(_toml_type(hints[f.name]))}\\fR"]
        keys.append(_roff(f"default: {default}"))
    heading = [f".SS [{_roff(name)}]"] if name else []
    return heading + keys + tables


def config_page() -> str:
    lines = [
        f'.TH CXRD.TOML 5 "{_date()}" "cxrd {__version__}" "{MANUAL}"',
        ".SH NAME",
        "cxrd.toml \\- configuration of cxrd, the CloudXR runtime service",
        ".SH SYNOPSIS",
        "\\fI~/.config/cxrd/cxrd.toml\\fR (or \\fBcxrd \\-\\-config\\fR \\fIPATH\\fR)",
        ".SH DESCRIPTION",
        _roff(
            "A TOML file. Precedence, lowest first: the defaults below, this file, "
            "an isaacteleop-style KEY=value file given with --env-file, command-line "
            "flags. A bad file, key, type or reserved variable is an error naming the "
            "file and the key, and the daemon does not start."
        ),
        ".SH KEYS",
        *_table(Config, Config(), ""),
        ".SH SEE ALSO",
        _roff(_SEE_ALSO),
    ]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """Relative path under a man dir -> the page's roff."""
    return {
        "man1/cxrctl.1": _parser_page("cxrctl", 1),
        "man8/cxrd.8": _parser_page("cxrd", 8),
        "man5/cxrd.toml.5": config_page(),
    }


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cxrd.cli.manpages MANDIR  (e.g. STAGE/usr/share/man)")
    for relative, text in pages().items():
        path = Path(sys.argv[1]) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path)


if __name__ == "__main__":
    main()
