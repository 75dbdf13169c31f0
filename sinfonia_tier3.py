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
