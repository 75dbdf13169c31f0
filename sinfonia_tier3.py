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

_ROOT_HELPER_FLAG = "--root-helper"
_ROOT_HELPER_MAX_REQUEST = 16384
_IFNAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_NS_GET_USERNS = 0xB701      # _IO(0xb7, 0x1), linux/nsfs.h
_NS_GET_OWNER_UID = 0xB704   # _IO(0xb7, 0x4)
_KERNEL_LINK_FIELDS = ("private_key", "peer_public_key", "endpoint", "listen_port",
                       "allowed_ips", "persistent_keepalive")


class _KernelLinkSpec(tuple):
    """What a kernel WireGuard link is configured with; built only through
    `_kernel_link_spec` or `_parse_kernel_link_request`, which validate it."""

    __slots__ = ()
    private_key = property(lambda self: self[0])           # 32 bytes
    peer_public_key = property(lambda self: self[1])       # 32 bytes
    endpoint = property(lambda self: self[2])              # (ip_address, port) or None
    listen_port = property(lambda self: self[3])           # 0: the kernel picks
    allowed_ips = property(lambda self: self[4])           # tuple of ip_network
    persistent_keepalive = property(lambda self: self[5])  # seconds, 0: off


def _kernel_link_spec(private_key, peer_public_key, *, endpoint=None, listen_port=0,
                      allowed_ips=(), persistent_keepalive=0):
    """Validate and bundle a kernel link's configuration; the one constructor
    both the caller and the root helper go through."""
    import ipaddress

    def refuse(why):
        raise TunnelError(f"invalid kernel WireGuard configuration: {why}")

    def port(value, name, low):
        if type(value) is not int or not low <= value <= 65535:
            refuse(f"{name} must be an integer from {low} to 65535")
        return value

    for name, key in (("private key", private_key), ("peer public key", peer_public_key)):
        if type(key) is not bytes or len(key) != 32:
            refuse(f"{name} must be 32 bytes")
        if key == bytes(32):
            refuse(f"{name} is all zeros")
    if endpoint is not None:
        if type(endpoint) is not tuple or len(endpoint) != 2:
            refuse("endpoint must be an address and a port")
        try:
            host = ipaddress.ip_address(endpoint[0])
        except ValueError:
            refuse("endpoint address must be an IPv4 or IPv6 literal")
        if host.is_unspecified or host.is_multicast:
            refuse(f"endpoint address {host} cannot be a peer")
        endpoint = (host, port(endpoint[1], "endpoint port", 1))
    networks = []
    for network in allowed_ips:
        try:
            networks.append(ipaddress.ip_network(network))
        except (TypeError, ValueError):
            refuse(f"allowed IP {network!r} is not a network in CIDR notation")
    if len(networks) > 256:
        refuse("more than 256 allowed IPs")
    if type(persistent_keepalive) is not int or not 0 <= persistent_keepalive <= 65535:
        refuse("persistent keepalive must be an integer from 0 to 65535")
    return _KernelLinkSpec((private_key, peer_public_key, endpoint,
                            port(listen_port, "listen port", 0), tuple(networks),
                            persistent_keepalive))


def _encode_kernel_link_request(spec):
    """The root helper's standard input: the spec as one JSON object."""
    import base64
    import json

    endpoint = None
    if spec.endpoint is not None:
        endpoint = [str(spec.endpoint[0]), spec.endpoint[1]]
    return json.dumps({
        "private_key": base64.b64encode(spec.private_key).decode(),
        "peer_public_key": base64.b64encode(spec.peer_public_key).decode(),
        "endpoint": endpoint,
        "listen_port": spec.listen_port,
        "allowed_ips": [str(network) for network in spec.allowed_ips],
        "persistent_keepalive": spec.persistent_keepalive,
    }).encode()


def _parse_kernel_link_request(data):
    """Parse the root helper's standard input, trusting none of it."""
    import base64
    import binascii
    import json

    def refuse(why):
        raise TunnelError(f"invalid kernel WireGuard configuration: {why}")

    def unique_keys(pairs):
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            refuse("a key appears twice")
        return dict(pairs)

    if len(data) > _ROOT_HELPER_MAX_REQUEST:
        refuse(f"more than {_ROOT_HELPER_MAX_REQUEST} bytes")
    try:
        request = json.loads(data.decode("utf-8"), object_pairs_hook=unique_keys,
                             parse_constant=lambda name: refuse(f"{name} is not allowed"))
    except (UnicodeDecodeError, ValueError):
        refuse("not a JSON object")
    if type(request) is not dict or set(request) != set(_KERNEL_LINK_FIELDS):
        refuse("expected exactly the keys " + ", ".join(_KERNEL_LINK_FIELDS))

    def key(name):
        text = request[name]
        if type(text) is not str or len(text) != 44:
            refuse(f"{name} must be 44 characters of base64")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            refuse(f"{name} is not valid base64")

    endpoint = request["endpoint"]
    if endpoint is not None:
        if (type(endpoint) is not list or len(endpoint) != 2
                or type(endpoint[0]) is not str):
            refuse("endpoint must be [address, port] or null")
        endpoint = tuple(endpoint)
    allowed_ips = request["allowed_ips"]
    if type(allowed_ips) is not list or not all(type(n) is str for n in allowed_ips):
        refuse("allowed_ips must be a list of strings")
    return _kernel_link_spec(
        key("private_key"), key("peer_public_key"), endpoint=endpoint,
        listen_port=request["listen_port"], allowed_ips=allowed_ips,
        persistent_keepalive=request["persistent_keepalive"])


def _check_interface_name(name):
    """Refuse anything but a short name of lower-case letters, digits, - and _."""
    if (type(name) is not str or not 1 <= len(name) <= 15 or not name[0].isalpha()
            or not set(name) <= _IFNAME_CHARACTERS):
        raise TunnelError(f"invalid interface name {name!r}: 1 to 15 characters "
                          "a-z 0-9 - _, starting with a letter")
    return name


def _create_kernel_link(ifname, spec, netns_fd):
    """Create kernel WireGuard link `ifname` here, configure it, move it into the
    network namespace `netns_fd`; its UDP socket stays in this namespace.

    On any failure the link is removed again: either it ends up in the target
    namespace, or it does not exist.
    """
    import base64

    from pyroute2 import IPRoute, WireGuard
    from pyroute2.netlink.exceptions import NetlinkError

    peer = {
        "public_key": base64.b64encode(spec.peer_public_key).decode(),
        "persistent_keepalive": spec.persistent_keepalive,
        "replace_allowed_ips": True,
        "allowed_ips": [str(network) for network in spec.allowed_ips],
    }
    if spec.endpoint is not None:
        peer["endpoint_addr"] = str(spec.endpoint[0])
        peer["endpoint_port"] = spec.endpoint[1]
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=ifname, kind="wireguard")
        except NetlinkError as e:
            raise TunnelError(f"cannot create kernel WireGuard link {ifname}: "
                              f"{os.strerror(e.code)}") from None
        moved = False
        try:
            (index,) = ipr.link_lookup(ifname=ifname)
            wg = WireGuard()
            try:
                wg.set(ifname, private_key=base64.b64encode(spec.private_key).decode(),
                       listen_port=spec.listen_port, peer=peer)
            finally:
                wg.close()
            ipr.link("set", index=index, net_ns_fd=netns_fd)
            moved = True
        except NetlinkError as e:
            raise TunnelError(f"cannot configure kernel WireGuard link {ifname}: "
                              f"{os.strerror(e.code)}") from None
        finally:
            if not moved:
                try:
                    ipr.link("del", ifname=ifname)
                except NetlinkError:
                    pass


def _open_caller_netns(pid, uid):
    """The network namespace fd of process `pid`, after checking that `pid` is
    a live process of user `uid` in a network namespace other than ours, owned
    by a user namespace that `uid` owns.

    The process is pinned with a pidfd and its /proc directory opened before
    the checks; the pidfd still being alive afterwards proves that directory
    was not a reused PID's.
    """
    import signal

    def refuse(why):
        raise TunnelError(f"root helper refuses process {pid}: {why}")

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        refuse("no such process")
    try:
        try:
            proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            refuse("no such process")
        try:
            try:
                signal.pidfd_send_signal(pidfd, 0)
            except ProcessLookupError:
                refuse("it exited")
            try:
                status = _read_proc_file("status", proc)
                netns_fd = os.open("ns/net", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
            except OSError:
                refuse("it exited")
        finally:
            os.close(proc)
        try:
            uids = next((line.split()[1:] for line in status.splitlines()
                         if line.startswith("Uid:")), [])
            if uids != [str(uid)] * 4:
                refuse(f"it does not belong to user {uid}")
            own = os.stat("/proc/self/ns/net")
            theirs = os.fstat(netns_fd)
            if (own.st_dev, own.st_ino) == (theirs.st_dev, theirs.st_ino):
                refuse("it is in the helper's own network namespace")
            userns_fd = fcntl.ioctl(netns_fd, _NS_GET_USERNS)
            try:
                owner = bytearray(4)
                fcntl.ioctl(userns_fd, _NS_GET_OWNER_UID, owner)
                own_userns = os.stat("/proc/self/ns/user")
                userns = os.fstat(userns_fd)
            finally:
                os.close(userns_fd)
            if (own_userns.st_dev, own_userns.st_ino) == (userns.st_dev, userns.st_ino):
                refuse("its network namespace belongs to the helper's user namespace")
            if struct.unpack("=I", owner)[0] != uid:
                refuse(f"its network namespace is not owned by user {uid}")
            return netns_fd
        except BaseException:
            os.close(netns_fd)
            raise
    finally:
        os.close(pidfd)


def _read_proc_file(name, dir_fd):
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, 65536).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _root_helper_main(args, stdin):
    """`--root-helper PID IFNAME`, run as root by sudo: create, configure and
    move one kernel WireGuard link into the invoking user's namespace.

    Everything is untrusted: the arguments, SUDO_UID and the configuration on
    `stdin`. Returns the exit status; every refusal is one line on stderr.
    """
    try:
        if os.geteuid() != 0:
            raise TunnelError("root helper: must run as root (through sudo)")
        sudo_uid = os.environ.get("SUDO_UID", "")
        if not sudo_uid.isdigit() or not sudo_uid.isascii():
            raise TunnelError("root helper: SUDO_UID is missing; run it through sudo")
        if len(args) != 2:
            raise TunnelError("root helper: usage: --root-helper PID IFNAME")
        pid_text, ifname = args
        if not (pid_text.isascii() and pid_text.isdigit() and 0 < len(pid_text) < 8
                and int(pid_text) > 1):
            raise TunnelError(f"root helper: invalid PID {pid_text!r}")
        _check_interface_name(ifname)
        spec = _parse_kernel_link_request(stdin.read(_ROOT_HELPER_MAX_REQUEST + 1))
        netns_fd = _open_caller_netns(int(pid_text), int(sudo_uid))
        try:
            _create_kernel_link(ifname, spec, netns_fd)
        finally:
            os.close(netns_fd)
    except SinfoniaError as e:
        print(f"sinfonia-tier3: {e}", file=sys.stderr)
        return e.exit_status
    return 0


def _this_program():
    """The file to re-exec: this module's file, or the zipapp archive holding it."""
    path = os.path.abspath(__file__)
    while not os.path.isfile(path):
        parent = os.path.dirname(path)
        if parent == path:
            raise TunnelError(f"cannot find the file this module runs from ({__file__})")
        path = parent
    return path


def _root_helper_command(pid, ifname, *, interactive=False):
    """The sudo command line that runs the root helper for `pid` and `ifname`."""
    return ["sudo", *(() if interactive else ("-n",)), "--", sys.executable,
            _this_program(), _ROOT_HELPER_FLAG, str(pid), ifname]


def _provide_kernel_link(pid, ifname, spec, *, use_sudo, timeout=30):
    """Create kernel WireGuard link `ifname` for process `pid`'s network namespace:
    directly when root, else through the sudo root helper (non-interactive unless
    a terminal can ask for the password)."""
    import subprocess

    _check_interface_name(ifname)
    if not use_sudo:
        netns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _create_kernel_link(ifname, spec, netns_fd)
        finally:
            os.close(netns_fd)
        return
    command = _root_helper_command(pid, ifname, interactive=sys.stdin.isatty())
    try:
        result = subprocess.run(command, input=_encode_kernel_link_request(spec),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                timeout=timeout, check=False)
    except FileNotFoundError:
        raise TunnelError("kernel WireGuard needs root, and sudo is not installed") from None
    except subprocess.TimeoutExpired:
        raise TunnelError(f"the sudo root helper did not finish in {timeout} s") from None
    if result.returncode:
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {result.returncode}"
        raise TunnelError(f"the sudo root helper failed: {why}")


# Orchestration ###############################################################


# Command line ################################################################


def main(argv=None):
    """Entry point of the `sinfonia-tier3` script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_ROOT_HELPER_FLAG]:
        return _root_helper_main(argv[1:], sys.stdin.buffer)
    print(f"sinfonia-tier3 {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
