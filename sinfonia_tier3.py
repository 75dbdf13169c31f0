"""sinfonia-tier3: get an edge backend deployed on a nearby cloudlet and run the
application inside a private network namespace whose only way out is a
WireGuard tunnel to that backend, without root.

Usage: sinfonia-tier3 [options] TIER1_URL APPLICATION [--] [COMMAND [ARGS...]]
"""

__version__ = "0.1.0.dev0"

__all__ = [
    "SinfoniaError",
    "main",
]

import fcntl
import os
import struct
import sys

# Constants and errors ########################################################


class SinfoniaError(Exception):
    """A failure of sinfonia-tier3 itself; its message is the one line shown."""

    kind = "internal"
    exit_status = 125


class TunnelError(SinfoniaError):
    """The tunnel or the namespace around the application could not be set up."""

    kind = "tunnel"


# Keys and key cache ##########################################################


# Tier 1 client and response validation #######################################


# Tunnel configuration and renderers ##########################################


# WireGuard protocol ##########################################################


# Datapath event loop #########################################################

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


def _open_tun(name, vnet_hdr=False):
    """Create (or attach to) TUN device `name` in the current network namespace.

    Returns the non-blocking file descriptor. With `vnet_hdr` every packet read
    or written carries a virtio_net_hdr first, which is what lets the datapath
    write many TCP segments to the kernel in one call.
    """
    flags = _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TunnelError(f"cannot open /dev/net/tun: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as e:
        os.close(fd)
        raise TunnelError(f"cannot create TUN device {name}: {e.strerror}") from None
    return fd


# Namespace runner ############################################################


# Kernel backend and root helper ##############################################


# Orchestration ###############################################################


# Command line ################################################################


def main(argv=None):
    """Entry point of the `sinfonia-tier3` script; returns the exit status."""
    print(f"sinfonia-tier3 {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
