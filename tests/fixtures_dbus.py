"""Fixtures: dbus (filled in by its owner)."""
