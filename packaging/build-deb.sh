#!/usr/bin/env bash
# Build the cxrd Debian package: a self-contained venv under /usr/lib/cxrd on
# Debian's own python3.11, with every dependency vendored as wheels from PyPI at
# build time, plus the systemd user unit and the D-Bus activation file.
#
#   packaging/build-deb.sh [--without-cloudxr] [--out DIR] [--compress xz|gzip|none]
#
# --without-cloudxr  leave out the isaacteleop runtime (about 110 MB with numpy);
#                    add it later with: sudo /usr/lib/cxrd/bin/pip install 'isaacteleop>=1.4.142,<1.6'
# --out DIR          where the .deb goes (default packaging/out); DIR/wheels keeps the
#                    wheelhouse, so a rebuild downloads nothing new
# Needs: Debian 12 (python3.11, python3.11-venv, dpkg-deb), PyPI.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=$here/out
extras="[cloudxr]"
compress=xz
python=${PYTHON:-/usr/bin/python3.11}
prefix=/usr/lib/cxrd

while (($#)); do
    case $1 in
    --without-cloudxr) extras="" ;;
    --out) out=$2; shift ;;
    --compress) compress=$2; shift ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "build-deb: $*" >&2; exit 1; }
[[ -x $python ]] || die "$python not found (apt-get install python3.11 python3.11-venv)"
"$python" -c 'import ensurepip, venv' 2>/dev/null || die "apt-get install python3.11-venv"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$repo/pyproject.toml")
arch=$(dpkg --print-architecture)
debversion="$version-1"

mkdir -p "$out/wheels"
out=$(cd "$out" && pwd)
wheels=$out/wheels
work=$(mktemp -d -t cxrd-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
stage=$work/root
venv=$stage$prefix

echo "build-deb: cxrd $debversion ($arch), venv on $("$python" --version)"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)

# The project's own wheel, then every dependency as a wheel from PyPI.
rm -f "$wheels"/cxrd-*.whl
"${pip[@]}" wheel --no-deps --wheel-dir "$wheels" "$repo"
wheel=$(ls "$wheels"/cxrd-"$version"-*.whl)
# `pip wheel` builds the few sdist-only ones (sdnotify) into wheels, so the install
# below needs no index and no build tools.
"${pip[@]}" wheel --prefer-binary --wheel-dir "$wheels" "$wheel$extras"
"${pip[@]}" install --no-index --find-links "$wheels" --no-compile "$wheel$extras"
# Shell completions and man pages, generated from the parsers and the config schema
# by the cxrd just installed; argparse-manpage is needed for this step only.
"$venv/bin/python" -I -m cxrd.cli.completions "$stage/usr" >/dev/null
"${pip[@]}" install --no-compile argparse-manpage
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)} \
    "$venv/bin/python" -I -m cxrd.cli.manpages "$stage/usr/share/man" >/dev/null
gzip -9n "$stage"/usr/share/man/man*/*
# setuptools came with the venv, argparse-manpage for the pages; nothing at run time needs them.
"${pip[@]}" uninstall -y setuptools argparse-manpage

# A venv records where it was made: point every such path at its installed home.
grep -rlF --null "$stage" "$venv" | xargs -0 -r sed -i "s|$stage||g"
if grep -rqF "$stage" "$stage"; then
    die "staging path left in: $(grep -rlF "$stage" "$stage" | head -3)"
fi
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +

install -d "$stage/usr/bin" "$stage/usr/lib/systemd/user" "$stage/usr/share/dbus-1/services" \
    "$stage/usr/share/doc/cxrd"
ln -s "../lib/cxrd/bin/cxrd" "$stage/usr/bin/cxrd"
ln -s "../lib/cxrd/bin/cxrctl" "$stage/usr/bin/cxrctl"
# The checked-in unit and activation file already run /usr/bin/cxrd.
install -m 0644 "$repo/systemd/cloudxr.service" "$stage/usr/lib/systemd/user/cloudxr.service"
install -m 0644 "$repo/systemd/cloudxr@.service" "$stage/usr/lib/systemd/user/cloudxr@.service"
install -m 0644 "$repo/dbus/io.github.cxrd.Daemon1.service" \
    "$stage/usr/share/dbus-1/services/io.github.cxrd.Daemon1.service"
[[ -f $repo/README.md ]] && install -m 0644 "$repo/README.md" "$stage/usr/share/doc/cxrd/README.md"
install -m 0644 "$here/README.md" "$stage/usr/share/doc/cxrd/README.Debian.md"
# Firewall services for the proxy, signaling and media ports (and native clients'):
# installed, never enabled (`firewall-cmd --add-service=cloudxr`, `ufw allow CloudXR`).
install -d "$stage/usr/lib/firewalld/services" "$stage/etc/ufw/applications.d"
install -m 0644 "$here/firewalld/cloudxr.xml" "$here/firewalld/cloudxr-native.xml" \
    "$stage/usr/lib/firewalld/services/"
install -m 0644 "$here/ufw/cloudxr" "$stage/etc/ufw/applications.d/cloudxr"

# Copyright: cxrd, then every distribution vendored into the venv with its licence.
"$venv/bin/python" -I - "$stage/usr/share/doc/cxrd/copyright" <<'PY'
import sys
from importlib import metadata

lines = [
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
    "Upstream-Name: cxrd",
    "",
    "Files: *",
    "License: Apache-2.0",
    " On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.",
    "",
    "Comment: Python distributions vendored under /usr/lib/cxrd, each under its own licence",
    " (see its .dist-info directory):",
]
for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
    meta = dist.metadata
    licence = meta.get("License-Expression") or meta.get("License") or ""
    if not licence or len(licence) > 80:
        classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
        licence = ", ".join(classifiers) or "see its dist-info"
    lines.append(f" {meta['Name']} {meta['Version']}: {licence.splitlines()[0]}")
with open(sys.argv[1], "w", encoding="utf-8") as handle:
    handle.write("\n".join(lines) + "\n")
PY

# The oldest glibc the vendored manylinux wheels accept.
glibc=$(ls "$wheels" | "$python" -c '
import re, sys
best = (2, 17)
for name in sys.stdin:
    for major, minor in re.findall(r"manylinux_(\d+)_(\d+)", name):
        best = max(best, (int(major), int(minor)))
print("%d.%d" % best)')

install -d "$stage/DEBIAN"
echo /etc/ufw/applications.d/cloudxr >"$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<EOF
Package: cxrd
Version: $debversion
Architecture: $arch
Maintainer: cxrd maintainers <maintainers@cxrd.invalid>
Installed-Size: $size
Depends: python3.11, libc6 (>= $glibc)
Recommends: systemd, dbus-user-session | default-dbus-session-bus | dbus-session-bus
Section: misc
Priority: optional
Description: per-user service for the NVIDIA CloudXR runtime and its WSS proxy
 cxrd runs the CloudXR runtime and a WebSocket-over-TLS proxy as supervised
 child process groups, reports readiness to systemd, and is controlled over
 the D-Bus session bus (io.github.cxrd.Daemon1) and with cxrctl.
 .
 Start it with "systemctl --user start cloudxr"; any D-Bus client starts it
 on demand. Python and its dependencies are vendored in /usr/lib/cxrd.
EOF
cat >"$stage/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    # Byte-compile as root once; users cannot write into /usr/lib/cxrd.
    /usr/lib/cxrd/bin/python -m compileall -q -j 0 /usr/lib/cxrd/lib >/dev/null || true
fi
EOF
cat >"$stage/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
# The byte-code postinst made is not in the package's file list: remove it here.
find /usr/lib/cxrd -name __pycache__ -type d -prune -exec rm -rf {} + || true
EOF
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm"

deb=$out/cxrd_${debversion}_${arch}.deb
dpkg-deb --root-owner-group -Z"$compress" --build "$stage" "$deb" >/dev/null
echo "build-deb: $deb ($(du -h "$deb" | cut -f1))"
