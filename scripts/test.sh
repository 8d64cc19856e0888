#!/usr/bin/env bash
# Set up, lint (ruff, mypy --strict), then run the whole test suite (pytest) at
# the newest dependency versions (.venv), then its fast part (all but the tests
# marked slow: systemd, packaging) with every dependency at its declared floor
# (.venv-floors; see scripts/floors.py).
# Extra arguments go to pytest: scripts/test.sh -k systemd -x. Given any, the
# floors run is left out unless CXRD_FLOORS=1; CXRD_FLOORS=0 always leaves it out.
# Exits non-zero when a linter or a test fails, and when pytest collected no
# test at all. Pytest runs last, so its summary is the closing line.
# CXRD_SKIP_LINT=1 skips the linters.
set -euo pipefail
cd "$(dirname "$0")/.."

floors=${CXRD_FLOORS:-$(($# == 0))}
if ((floors)); then
    bash scripts/setup.sh --floors
else
    bash scripts/setup.sh
fi

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

# pytest VENV [args]: the suite under VENV's interpreter, timed; 5 (nothing
# collected) counts as a failure.
pytest() {
    local venv=$1 rc=0 start=$SECONDS
    shift
    echo "test.sh: pytest in $venv ($("$venv/bin/python" --version))"
    "$venv/bin/python" -m pytest "$@" || rc=$?
    echo "test.sh: pytest in $venv: exit $rc after $((SECONDS - start)) s"
    if ((rc == 5)); then
        echo "test.sh: pytest collected no tests in $venv; that is a failure" >&2
        rc=1
    fi
    return "$rc"
}

status=0
pytest .venv "$@" || status=$?
if ((floors)); then
    pytest .venv-floors -m "not slow" -p no:cacheprovider "$@" || status=1
fi
if ((lint != 0)); then
    echo "test.sh: lint failed (see ruff/mypy above)" >&2
    exit 1
fi
exit "$status"
