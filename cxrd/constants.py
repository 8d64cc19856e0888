"""Every name that crosses a process boundary, in one place.

The daemon, the client, the CLI, the unit files and the tests all read these;
nothing else spells a bus name, an object path or a file name of the run dir.
"""

from collections.abc import Mapping
from typing import Final

# D-Bus wire names (DESIGN §5).
BUS_NAME: Final = "io.github.cxrd.Daemon1"
OBJECT_PATH: Final = "/io/github/cxrd/Daemon1"
INTERFACE: Final = "io.github.cxrd.Daemon1"
ERROR_PREFIX: Final = "io.github.cxrd.Error."
INTERFACE_VERSION: Final = 1
INTROSPECTION_XML: Final = f"{INTERFACE}.xml"  # dbus/ and cxrd/data/

# The bus driver (its bus name is also its interface) and the standard interfaces.
DBUS: Final = "org.freedesktop.DBus"
DBUS_PATH: Final = "/org/freedesktop/DBus"
PROPERTIES: Final = f"{DBUS}.Properties"
INTROSPECTABLE: Final = f"{DBUS}.Introspectable"
PEER: Final = f"{DBUS}.Peer"

# systemd names (DESIGN §6).
UNIT_NAME: Final = "cloudxr.service"
UNIT_TEMPLATE: Final = "cloudxr@.service"  # named instances: cloudxr@NAME.service
DBUS_SERVICE_FILE: Final = f"{BUS_NAME}.service"

# Files of the install dir, compatible with isaacteleop's layout (DESIGN §4).
DEFAULT_INSTALL_DIR: Final = "~/.cloudxr"
RUN_DIR: Final = "run"
LOGS_DIR: Final = "logs"
CERTS_DIR: Final = "certs"
SENTINEL_FILE: Final = "runtime_started"
IPC_SOCKET: Final = "ipc_cloudxr"
# sun_path holds 108 bytes with its terminating NUL, which C runtimes write.
MAX_SOCKET_PATH: Final = 107
STALE_RUN_FILES: Final = (IPC_SOCKET, SENTINEL_FILE, "monado.pid", "cloudxr.pid")
ENV_FILE: Final = "cloudxr.env"
EULA_MARKER: Final = "eula_accepted"
EULA_MARKER_TEXT: Final = "accepted"
LAST_ERROR_FILE: Final = "cxrd.last_error"
LOCK_FILE: Final = "cxrd.lock"
RUNTIME_STDERR_LOG: Final = "runtime_stderr.log"
SERVER_LOG_GLOB: Final = "cxr_server.*.log"
PROXY_LOG: Final = "wss.log"
CLIENT_DIR: Final = "static-client"  # the web client, where isaacteleop keeps it
CLIENT_DIR_ENV: Final = "TELEOP_WEB_CLIENT_STATIC_DIR"
CERT_FILE: Final = "server.crt"
KEY_FILE: Final = "server.key"

# Ports (CLOUDXR_FACTS: proxy 48322, runtime signaling 49100).
DEFAULT_PROXY_PORT: Final = 48322
DEFAULT_BACKEND_PORT: Final = 49100
DEFAULT_MEDIA_PORT: Final = 47998  # UDP

# Environment cxrd sets on the runtime from runtime.signaling_port, media_port, gpu.
SERVER_PORT_ENV: Final = "NV_CXR_SERVER_PORT"
MEDIA_PORT_ENV: Final = "NV_CXR_MEDIA_PORT"
GPU_CUDA_ENV: Final = "NV_CXR_GPU_INDEX_CUDA"
GPU_VULKAN_ENV: Final = "NV_CXR_GPU_INDEX_VULKAN"  # exclusive with the CUDA index

# Environment the runtime always gets computed, never from a user's file.
RESERVED_ENV_KEYS: Final = frozenset(
    {
        "XR_RUNTIME_JSON",
        "NV_CXR_RUNTIME_DIR",
        "NV_CXR_OUTPUT_DIR",
        "XRT_NO_STDIN",
        "CXR_INSTALL_DIR",
        "CXR_HOST_VOLUME_PATH",
    }
)
DEVICE_PROFILE_ENV: Final = "NV_DEVICE_PROFILE"
DEFAULT_DEVICE_PROFILE: Final = "Quest3"
DEFAULT_RUNTIME_ENV: Final = {
    "NV_CXR_ENABLE_PUSH_DEVICES": "true",
    "NV_CXR_ENABLE_TENSOR_DATA": "true",
    "NV_CXR_FILE_LOGGING": "true",
}

# What `cxrctl run` adds to COMMAND's environment so that launchers which would
# start a CloudXR runtime of their own use cxrd's instead; docs and the
# container examples point here. Each entry says where it comes from.
STAND_ASIDE: Final[Mapping[str, str]] = {
    # Isaac Lab 3.0, isaaclab_teleop/session_lifecycle.py: skips its own
    # CloudXRLauncher when this is exactly "1".
    "ISAACLAB_CXR_SKIP_AUTOLAUNCH": "1",
}
