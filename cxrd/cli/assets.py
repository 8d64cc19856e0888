"""``cxrctl cert renew`` and ``cxrctl client fetch``: the proxy's certificate and web client."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator

from cxrd.cli.common import Out, config_from_args
from cxrd.errors import InvalidArgs


def cmd_cert(args: argparse.Namespace) -> int:
    from cxrd.proxy.certs import renew_certificate, validate_pair

    config = config_from_args(args)
    if config.proxy.cert is not None:
        raise InvalidArgs(
            f"proxy.cert is {config.proxy.cert}: a pair of yours, which cxrd never replaces"
        )
    cert, key = renew_certificate(config.certs_dir)
    info = validate_pair(cert, key)
    out = Out(sys.stdout)
    out.line(f"renewed {cert}, valid until {info.not_after:%Y-%m-%d}")
    out.line("the proxy loads it when it starts again: `cxrctl restart`; then each headset")
    out.line("must accept it again on the certificate page (`cxrctl url`)")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    """``client fetch``: SIGINT, SIGTERM or SIGHUP stop it cleanly, its staging dir removed."""
    from cxrd.system import webclient

    config = config_from_args(args)
    source = args.source or webclient.default_source()
    err = Out(sys.stderr)

    def progress(name: str, done: int, total: int | None) -> None:
        of = f" of {total / 1e6:.1f}" if total else ""
        err.stream.write(f"\r\033[K{name}: {done / 1e6:.1f}{of} MB")
        err.stream.flush()

    try:
        with _stopped_by_signals():
            target = webclient.fetch(
                config.client_path,
                source,
                force=args.force,
                progress=progress if err.tty else None,
                timeout=args.timeout,
            )
    except _Stopped as stop:
        err.line(f"stopped by {stop.name}; the client dir is as it was")
        return 128 + stop.signum
    finally:
        if err.tty:
            err.stream.write("\r\033[K")
            err.stream.flush()
    Out(sys.stdout).line(f"web client from {source} is in {target}; served at /client/")
    return 0


class _Stopped(BaseException):
    """A signal asked the fetch to stop: a BaseException, so no ``except Exception`` eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """The first of SIGINT/SIGTERM/SIGHUP raises :class:`_Stopped`; later ones are ignored.

    A signal ignored when cxrctl started (``nohup``, a background job) stays ignored.
    """
    caught = [s for s in _STOPS if signal.getsignal(s) is not signal.SIG_IGN]

    def stop(signum: int, frame: object) -> None:
        for s in caught:
            signal.signal(s, signal.SIG_IGN)  # the cleanup runs once, whole
        raise _Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in caught}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
