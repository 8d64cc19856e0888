#!/usr/bin/env bash
# Set up, lint (ruff, mypy --strict), then run the whole test suite (pytest).
# Extra arguments go to pytest: scripts/test.sh -k systemd -x
# Exits non-zero when a linter or a test fails, and when pytest collected no
# test at all. Pytest runs last, so its summary is the closing line.
# CXRD_SKIP_LINT=1 skips the linters.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

if [[ $(id -u) == 0 ]]; then
    # The mark of a systemd-booted machine; the systemd --user that the tests
    # start checks for it. Harmless where systemd really runs.
    mkdir -p /run/systemd/system
fi

lint=0
if [[ ${CXRD_SKIP_LINT:-0} != 1 ]]; then
    .venv/bin/ruff check cxrd tests bench || lint=1
    .venv/bin/mypy || lint=1
fi

status=0
.venv/bin/python -m pytest "$@" || status=$?
if ((status == 5)); then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
if ((lint != 0)); then
    echo "test.sh: lint failed (see ruff/mypy above)" >&2
    exit 1
fi
exit "$status"
