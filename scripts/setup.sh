#!/usr/bin/env bash
# Set up everything cxrd and its tests need, idempotently:
#   1. Debian packages (the bus, systemd's user manager, openssl, ...) that are
#      missing, with one `apt-get update` first when anything must be installed;
#   2. .venv with cxrd installed editable, with its test tools and the CloudXR
#      runtime package (`-e .[test,cloudxr]`), redone only when pyproject changes;
#   3. with --floors, also .venv-floors: the same, but every dependency of
#      [project] and of [cloudxr] at exactly its declared floor (the pins come
#      from pyproject.toml through scripts/floors.py).
# Usage: scripts/setup.sh [--floors]   (root, or a user with sudo, for step 1 when needed)
set -euo pipefail
cd "$(dirname "$0")/.."

# dbus + dbus-user-session: the session bus under `systemd --user`; systemd:
# the user manager, systemctl, busctl; libglib2.0-bin: gdbus (tests use a D-Bus
# tool nobody here wrote); openssl: certificate checks; python3-venv: .venv;
# util-linux: unshare (cxrd as PID 1 of a fresh PID namespace); tini: the same under an init.
# chromium: the headless browser the headset tests open the web client in.
# man-db, mandoc: render and lint the man pages; bash-completion, zsh, fish: the
# shells whose completions the tests query.
# nftables: nft, for doctor's firewall tests (rules only in a throwaway netns).
# firewalld: firewall-offline-cmd loads the packaged services (a throwaway copy of
# its config); its service is never started here (see the policy-rc.d below).
# podman, runc (its OCI runtime here: crun refuses this machine's cgroup layout),
# catatonit (podman's --init), mmdebstrap (the Debian base image, no registry
# here): tests/test_image.py builds and runs packaging/container/Containerfile.
packages=(dbus dbus-user-session dbus-bin systemd openssl libglib2.0-bin python3-venv procps
    util-linux tini chromium man-db mandoc bash-completion zsh fish nftables firewalld
    podman runc catatonit mmdebstrap)

installed() {
    dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed
}

missing=()
if command -v dpkg-query >/dev/null; then
    for pkg in "${packages[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
else
    echo "setup: not a Debian system; install by hand: ${packages[*]}" >&2
fi

if ((${#missing[@]})); then
    sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null || {
            echo "setup: missing ${missing[*]}; run as root or install them" >&2
            exit 1
        }
        sudo=(sudo)
    fi
    echo "setup: installing ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    # No service a package installs may start (firewalld would take over the
    # host's firewall): Docker images refuse with a policy-rc.d; elsewhere, one for now.
    policy=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 0755 "$policy"
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    [[ -z $policy ]] || "${sudo[@]}" rm -f "$policy"
    if [[ " ${missing[*]} " == *" firewalld "* ]]; then
        # Nor at the next boot: only its offline tool is wanted here.
        "${sudo[@]}" systemctl --root=/ disable firewalld.service >/dev/null 2>&1 || true
    fi
fi

python=${PYTHON:-python3}
"$python" - <<'PY' || { echo "setup: cxrd needs Python 3.11 or newer ($python)" >&2; exit 1; }
import sys
sys.exit(sys.version_info < (3, 11))
PY

want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
# install_venv DIR [pip args]: cxrd editable with [test,cloudxr] into DIR, redone
# only when pyproject.toml changes.
install_venv() {
    local venv=$1 stamp=$1/.cxrd-setup
    shift
    if [[ ! -x $venv/bin/python ]]; then
        echo "setup: creating $venv with $("$python" --version)"
        "$python" -m venv "$venv"
    fi
    if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]] || ! "$venv/bin/python" -c 'import cxrd, pytest' 2>/dev/null; then
        echo "setup: installing cxrd into $venv (editable, with [test,cloudxr]) $*"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" -e '.[test,cloudxr]'
        echo "$want" >"$stamp"
    fi
}

install_venv .venv
# podman-compose runs packaging/container/compose.yaml in tests/test_image.py
# (1.4: the override file's `!reset`).
if [[ ! -x .venv/bin/podman-compose ]]; then
    echo "setup: installing podman-compose into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check 'podman-compose>=1.4'
fi
echo "setup: ready (.venv/bin/cxrd, .venv/bin/cxrctl)"

# Isaac Lab's own CloudXR code for tests/test_isaaclab.py, fetched once into
# .cache/ (git-ignored; never fetched at test time): isaaclab_teleop/ out of the
# Isaac Lab 3.0.0 wheel (a zip; the test imports it by path), and isaacteleop
# 1.4.145 and 1.5.175 each in a --target dir of its own (its other imports,
# numpy, PyYAML, websockets, cryptography, are in .venv already). Each entry is
# built in a temporary dir and renamed into place, so a present one is whole.
cache=.cache
fetch_isaaclab() {
    local dest=$cache/isaaclab-3.0.0 tmp
    [[ -d $dest/isaaclab_teleop ]] && return
    echo "setup: fetching Isaac Lab 3.0.0 (isaaclab_teleop) into $dest"
    tmp=$(mktemp -d "$cache/.tmp.XXXXXX")
    .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps \
        --python-version 3.12 --only-binary=:all: -d "$tmp/wheel" isaaclab==3.0.0
    .venv/bin/python - "$tmp"/wheel/isaaclab-3.0.0-*.whl "$tmp/out" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    whl.extractall(sys.argv[2], [n for n in whl.namelist() if n.startswith("isaaclab_teleop/")])
PY
    mv "$tmp/out" "$dest" && rm -rf "$tmp"
}
fetch_isaacteleop() {
    local dest=$cache/isaacteleop-$1 tmp
    [[ -d $dest/isaacteleop ]] && return
    echo "setup: fetching isaacteleop $1 into $dest"
    tmp=$(mktemp -d "$cache/.tmp.XXXXXX")
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
        --no-compile --target "$tmp/out" "isaacteleop==$1"
    mv "$tmp/out" "$dest" && rm -rf "$tmp"
}
mkdir -p "$cache"
fetch_isaaclab
fetch_isaacteleop 1.4.145
fetch_isaacteleop 1.5.175

if [[ ${1:-} == --floors ]]; then
    mkdir -p .venv-floors
    .venv/bin/python scripts/floors.py --extra cloudxr >.venv-floors/constraints.txt
    install_venv .venv-floors --constraint .venv-floors/constraints.txt
    echo "setup: ready (.venv-floors at $(paste -sd' ' .venv-floors/constraints.txt))"
fi
