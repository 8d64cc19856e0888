"""Fixture modules, one per kind of real service the tests start."""

pytest_plugins = ["fixtures_daemon", "fixtures_dbus", "fixtures_proxy", "fixtures_systemd"]
