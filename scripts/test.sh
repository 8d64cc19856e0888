#!/usr/bin/env bash
# Set up, then run the whole test suite (pytest), then lint (ruff, mypy --strict).
# Extra arguments go to pytest: scripts/test.sh -k systemd -x
# Exits non-zero on any failure, and when pytest collected no test at all.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

if [[ $(id -u) == 0 ]]; then
    # The mark of a systemd-booted machine; the systemd --user that the tests
    # start checks for it. Harmless where systemd really runs.
    mkdir -p /run/systemd/system
fi

status=0
.venv/bin/python -m pytest "$@" || status=$?
if ((status == 5)); then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
if ((status != 0)); then
    exit "$status"
fi

if [[ ${CXRD_SKIP_LINT:-0} != 1 ]]; then
    .venv/bin/ruff check cxrd tests bench
    .venv/bin/mypy
fi
