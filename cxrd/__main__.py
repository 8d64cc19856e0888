"""``cxrd`` and ``python -m cxrd``: the daemon, with its signals held from the first line.

Importing the daemon takes a good part of a second. Until its event loop
handles SIGTERM, SIGINT and SIGHUP they are blocked (held, not lost), so one
that comes meanwhile is handled then rather than killing cxrd by the default
action or, as PID 1 of a container, being dropped by the kernel.
"""

import signal
import sys

HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main() -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    from cxrd.daemon import main as daemon

    return daemon()


if __name__ == "__main__":
    sys.exit(main())
