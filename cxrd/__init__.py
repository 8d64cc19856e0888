"""cxrd: the NVIDIA CloudXR runtime and its WSS proxy as a per-user service."""

__version__ = "0.1.0"
