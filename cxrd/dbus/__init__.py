"""dbus"""
