"""``cxrctl url``: the URLs a person opens on a headset, and how a status names headsets."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from cxrd.cli.common import Out, config_from_args

# Product tokens of the browsers headsets use, most specific first.
_AGENTS = (
    ("OculusBrowser", "Quest browser"),
    ("PicoBrowser", "Pico browser"),
    ("Wolvic", "Wolvic"),
    ("HeadlessChrome", "headless Chrome"),
    ("Edg/", "Edge"),
    ("Firefox/", "Firefox"),
    ("Chrome/", "Chrome"),
    ("Safari/", "Safari"),
)


def cmd_url(args: argparse.Namespace) -> int:
    # Imported here: segno and psutil cost every other cxrctl command ~50 ms at start
    # (bench/run_overhead.py --profile).
    import segno

    from cxrd.system.addresses import headset_urls

    config = config_from_args(args)
    urls = headset_urls(config.proxy.host, config.proxy.port)
    out = Out(sys.stdout)
    if args.json:
        out.line(json.dumps([dataclasses.asdict(u) for u in urls], indent=2))
        return 0
    for u in urls:
        out.line(f"{u.host}")
        out.line(f"  accept the certificate: {u.cert_page}")
        out.line(f"  web client:             {u.client}")
    if args.qr and urls:
        out.line()
        out.line(f"Scan to open {urls[0].client}")
        segno.make(urls[0].client, error="m").terminal(out=sys.stdout, compact=True)
    return 0


def describe_agent(user_agent: str) -> str:
    """A short name for a User-Agent header: "Quest browser", "Chrome", ..."""
    for token, name in _AGENTS:
        if token in user_agent:
            return name
    return user_agent[:40] or "unknown client"
