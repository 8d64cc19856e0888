"""Keep ``run/cloudxr.env`` what cxrd wrote while the runtime runs.

Other programs rewrite it: isaacteleop 1.4's ``CloudXRLauncher`` truncates it
and writes its own profile and ports before it notices a live runtime, and
whoever sources the file afterwards gets the wrong ones. An inotify watch on
the run dir (``readiness.Inotify``/``Watch``, on the event loop) sees every
close-after-write, rename and removal of that name; a moment later the file is
read again and, if it is not byte for byte what cxrd wrote, written back
(atomically, as :func:`write_env_file` always does).

Nothing here can loop on cxrd's own writes: every check compares the content
with what cxrd last wrote, and cxrd's own rename leaves exactly that.

One warning per episode: the first restore after :data:`QUIET` seconds without
one logs a WARNING (which keys differed) and becomes :meth:`EnvGuard.last_event`;
restores within the episode (a program writing in a loop) log at INFO. Events
within :data:`SETTLE` seconds of the first are one check.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cxrd.system.envfile import format_env, read_env_file, write_env_file
from cxrd.system.readiness import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    LOST,
    Inotify,
    Watch,
)

log = logging.getLogger(__name__)

SETTLE = 0.05  # seconds from the first event to the check: a burst is read once
QUIET = 2.0  # seconds without a restore that end an episode
_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE


class EnvGuard:
    """Writes the env file and, until :meth:`stop`, puts it back when others change it."""

    def __init__(self, on_event: Callable[[], None] = lambda: None) -> None:
        self._on_event = on_event
        self._path: Path | None = None
        self._env: dict[str, str] = {}
        self._text = b""
        self._inotify: Inotify | None = None
        self._watch: Watch | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._last_restore = -math.inf
        self._failed = False  # the last restore failed: the next success is news
        self._event = ""

    def last_event(self) -> str:
        """The last episode, for a person: "rewritten by another program at 14:02:11, restored"."""
        return self._event

    def publish(self, path: Path, env: Mapping[str, str]) -> None:
        """Write ``path`` and guard it. A failed write raises (nothing is guarded then)."""
        text = format_env(env).encode()
        if path != self._path:
            self.stop()
        write_env_file(path, env)
        # Set after the write: events are handled later on the loop, and see both.
        self._path, self._env, self._text = path, dict(env), text
        if self._inotify is None:
            self._start(path)

    def _start(self, path: Path) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            log.debug("no event loop: %s is not guarded", path)
            return
        try:
            inotify = Inotify()
        except (OSError, AttributeError) as exc:  # AttributeError: a libc without inotify
            log.warning("cannot watch %s (%s): other programs' changes stay", path, exc)
            return
        try:
            self._watch = Watch(inotify, path, _MASK)
        except OSError as exc:
            inotify.close()
            log.warning("cannot watch %s (%s): other programs' changes stay", path, exc)
            return
        self._inotify = inotify
        self._loop.add_reader(inotify.fd, self._on_readable)

    def stop(self) -> None:
        """Stop guarding (the runtime stopped); the file is left as it is. Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inotify is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._inotify.fd)  # a closed loop has none: no error
            self._inotify.close()
            self._inotify = self._watch = None
        self._path, self._env, self._text = None, {}, b""

    def _on_readable(self) -> None:
        assert self._inotify is not None and self._watch is not None and self._loop is not None
        name = self._path.name if self._path is not None else ""
        for wd, mask, event_name in self._inotify.events():
            if not self._watch.relevant(wd, mask, event_name):
                continue
            if mask & LOST or not self._watch.on_directory:
                self._lost = True
            elif event_name == name and mask & (IN_CREATE | _MASK) == IN_CREATE:
                continue  # just created: its writer's close comes next
            if self._timer is None:
                self._timer = self._loop.call_later(SETTLE, self._check)

    def _check(self) -> None:
        self._timer = None
        path = self._path
        if path is None or self._watch is None:
            return
        try:
            if self._lost:
                self._lost = False
                self._watch.renew()  # the run dir went: watch it again, or where it returns
            try:
                current: bytes | None = path.read_bytes()
            except FileNotFoundError:
                current = None
            if current != self._text:
                self._restore(path, current)
        except Exception as exc:  # a guard must never take the daemon down
            log.error("cannot guard %s: %s", path, exc)

    def _restore(self, path: Path, current: bytes | None) -> None:
        now = time.monotonic()
        first = now - self._last_restore > QUIET or self._failed
        self._last_restore, self._failed = now, False
        what = "removed" if current is None else "rewritten"
        detail = "" if current is None else f" ({_differences(path, self._env, current)})"
        try:
            write_env_file(path, self._env)
        except OSError as exc:
            log.error("%s was %s by another program; cannot restore it: %s", path, what, exc)
            outcome = f"not restored ({exc.strerror or exc})"
            first = self._failed = True  # a failure is always shown
        else:
            outcome = "restored"
            if first:
                log.warning("%s was %s by another program%s; restored", path, what, detail)
            else:
                log.info("%s was %s by another program again%s; restored", path, what, detail)
        if first:
            when = time.strftime("%H:%M:%S")  # local time
            self._event = f"{what} by another program at {when}, {outcome}"
            try:
                self._on_event()
            except Exception:
                log.exception("telling the supervisor about %s failed", path)


def _differences(path: Path, ours: Mapping[str, str], current: bytes) -> str:
    """Which keys another program's content has otherwise, for the log."""
    if not current.strip():
        return "emptied"
    try:
        theirs = read_env_file(path)  # what readers of the file see now
    except (OSError, ValueError) as exc:
        return f"unreadable: {exc}"
    return differences(ours, theirs) or "same values, other text"


def differences(ours: Mapping[str, str], theirs: Mapping[str, str]) -> str:
    """ "A, B differed; added: C; removed: D" (keys only ``theirs`` / only ``ours`` has); ''."""
    parts = []
    if differed := [k for k in sorted(ours.keys() & theirs.keys()) if ours[k] != theirs[k]]:
        parts.append(f"{', '.join(differed)} differed")
    if added := sorted(theirs.keys() - ours.keys()):
        parts.append(f"added: {', '.join(added)}")
    if removed := sorted(ours.keys() - theirs.keys()):
        parts.append(f"removed: {', '.join(removed)}")
    return "; ".join(parts)
