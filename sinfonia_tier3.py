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
#
# The application runs in a tree of processes forked from the tool:
#
#   tool (caller's namespaces: datapath, Tier 1)
#    `- holder: unshares user+net+mount+PID namespaces, waits for init
#        `- init: PID 1 of the new PID namespace; sets up the network, /proc
#            |    and resolv.conf, reaps orphans, passes signals on
#            `- application (exec'd as the caller, without capabilities)
#
# Tool and namespace talk over a SOCK_SEQPACKET pair: JSON messages, and the
# TUN descriptor as SCM_RIGHTS. Each child dies with its parent
# (PR_SET_PDEATHSIG), and everything in a PID namespace dies with its init,
# so nothing outlives the tool. The child is forked early and prepares what it
# can (namespaces, pyroute2, the interface) while the tool is still talking to
# Tier 1; the addresses, routes and command follow when they are known.

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MNT_DETACH = 0x2
_IFA_F_NODAD = 0x02

_RESOLV_CONF = "/etc/resolv.conf"
# Local resolver services reached through a socket file, not resolv.conf: hidden
# inside the namespace so that names go to the cloudlet's DNS.
_RESOLVER_SOCKET_DIRS = ("/run/systemd/resolve", "/run/nscd")
_SHELL_PROMPT = "sinfonia$ "
_SETUP_TIMEOUT = 30.0
_MAX_MESSAGE = 1 << 20


def _libc_call(name, *args):
    """Call a libc function that Python lacks; OSError on failure."""
    import ctypes

    function = getattr(ctypes.CDLL(None, use_errno=True), name)
    if function(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _unshare(flags):
    unshare = getattr(os, "unshare", None)  # Python 3.12+
    if unshare is not None:
        unshare(flags)
    else:
        _libc_call("unshare", flags)


def _mount(source, target, fstype, flags, data=None):
    _libc_call(
        "mount",
        source and source.encode(),
        target.encode(),
        fstype and fstype.encode(),
        flags,
        data and data.encode(),
    )


def _die_with_parent(parent_pid):
    """SIGKILL this process when its parent ends, even if that already happened."""
    _libc_call("prctl", _PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(125)


def _exit_status(wait_status):
    """A wait status as a shell reports it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


class _CommandError(SinfoniaError):
    """The application could not be started: 126 not executable, 127 not found."""

    kind = "command"

    def __init__(self, message, exit_status):
        super().__init__(message)
        self.exit_status = exit_status


class _Channel:
    """One end of the conversation between the tool and its namespace child:
    JSON messages, with file descriptors attached when needed."""

    def __init__(self, sock):
        self._sock = sock

    @classmethod
    def pair(cls):
        import socket

        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def fileno(self):
        return self._sock.fileno()

    def send(self, message, fds=()):
        import json
        import socket

        socket.send_fds(self._sock, [json.dumps(message).encode()], list(fds))

    def receive(self, timeout=None):
        """(message, fds) of the next message; message is None when the other
        side has closed. socket.timeout when nothing came within `timeout`."""
        import json
        import socket

        self._sock.settimeout(timeout)
        data, fds, _, _ = socket.recv_fds(self._sock, _MAX_MESSAGE, 4)
        return (json.loads(data) if data else None), fds

    def close(self):
        self._sock.close()


def _explain_userns_failure(error, proc_sys="/proc/sys"):
    """Why the kernel refused a user namespace, and what the user can do."""

    def sysctl(name):
        try:
            with open(os.path.join(proc_sys, *name.split("."))) as f:
                return f.read().strip()
        except OSError:
            return None

    if sysctl("kernel.unprivileged_userns_clone") == "0":
        return (
            "unprivileged user namespaces are disabled "
            "(kernel.unprivileged_userns_clone=0): enable them with "
            "`sudo sysctl -w kernel.unprivileged_userns_clone=1`, or run as root"
        )
    if sysctl("user.max_user_namespaces") == "0":
        return (
            "user namespaces are disabled (user.max_user_namespaces=0): allow them "
            "with `sudo sysctl -w user.max_user_namespaces=15000`, or run as root"
        )
    if sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return (
            "AppArmor restricts unprivileged user namespaces "
            "(kernel.apparmor_restrict_unprivileged_userns=1, as on Ubuntu 24.04): "
            "allow them with an AppArmor profile for this Python, or "
            "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, "
            "or run as root"
        )
    return (
        f"cannot create the application's user namespace: {error.strerror}: "
        "allow unprivileged user namespaces here (containers often forbid them), "
        "or run as root"
    )


def _enter_new_namespaces():
    """Unshare network, mount and PID namespaces, and for any caller but root a
    user namespace mapping the caller's own uid and gid. Its capabilities there
    last until exec, where the non-root uid loses them. (Root needs no user
    namespace and keeps being root, as with `ip netns exec`.)"""
    uid, gid = os.geteuid(), os.getegid()
    flags = _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID
    try:
        if uid == 0:
            _unshare(flags)
            return
        _unshare(flags | _CLONE_NEWUSER)
        for name, text in [("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")]:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError as e:
        raise TunnelError(_explain_userns_failure(e)) from None


def _tun_advice(path="/dev/net/tun"):
    if not os.path.exists(path):
        return "load the tun kernel module (`sudo modprobe tun`)"
    return (
        f"let your user open it (`sudo chmod 0666 {path}`, as most distributions "
        "ship it), or run as root"
    )


class _TunInside:
    """Interface of the userspace backend: a TUN device made inside the
    namespace; its descriptor goes to the tool, which runs the datapath."""

    name = "sinfonia0"

    def create(self, channel):
        """In the namespace child: make the device, hand its descriptor out."""
        try:
            fd = _open_tun(self.name)
        except TunnelError as e:
            raise TunnelError(f"{e}: {_tun_advice()}") from None
        channel.send({"interface": self.name}, fds=[fd])
        os.close(fd)


class _LinkMovedIn:
    """Interface made outside and moved in by the tool (the kernel backend):
    the child says {"awaiting_link": name}; the tool moves the link into the
    network namespace of `_Namespace.pid` and answers {"link_moved": name}."""

    def __init__(self, name):
        self.name = name

    def create(self, channel):
        channel.send({"awaiting_link": self.name})
        message, _ = channel.receive()
        if message != {"link_moved": self.name}:
            raise TunnelError(f"the tunnel link {self.name} was not moved in")


def _netlink_step(what, function, *args, **kwargs):
    """Run one pyroute2 request; a refusal becomes a TunnelError naming `what`."""
    from pyroute2 import NetlinkError

    try:
        return function(*args, **kwargs)
    except NetlinkError as e:
        raise TunnelError(f"cannot {what}: {os.strerror(e.code)}") from None


def _configure_interface(ipr, name, mtu, addresses, routes):
    """Addresses and routes on the tunnel interface, which is up already."""
    import ipaddress

    index = ipr.link_lookup(ifname=name)[0]
    for text in addresses:
        address = ipaddress.ip_interface(text)
        flags = _IFA_F_NODAD if address.version == 6 else 0  # usable at once
        _netlink_step(f"add address {address} to {name}", ipr.addr, "add", index=index,
                      address=str(address.ip), prefixlen=address.network.prefixlen,
                      flags=flags)
    for text in routes:
        _netlink_step(f"add a route to {text} via {name}", ipr.route, "replace",
                      dst=str(ipaddress.ip_network(text)), oif=index)


def _hide_path(path):
    """Cover a directory with an empty tmpfs (inside our mount namespace)."""
    _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")


def _place_resolv_conf(text, path=_RESOLV_CONF, hidden_dirs=_RESOLVER_SOCKET_DIRS,
                       staging="/tmp"):
    """Make `path` read `text` inside our mount namespace.

    A symlink (systemd-resolved's stub, resolvconf) is followed to the file it
    names; when that file is missing, it is created on a tmpfs over its
    directory. The file comes from a tmpfs mounted briefly on `staging`: the
    bind mount keeps it alive after the staging mount is gone, so nothing is
    ever written to disk.
    """
    for directory in hidden_dirs:
        if os.path.isdir(directory):
            _hide_path(directory)
    target = os.path.realpath(path)
    if not os.path.exists(target):
        directory = os.path.dirname(target)
        if not os.path.isdir(directory):
            raise TunnelError(f"{path} leads to {target}, whose directory does not exist")
        _hide_path(directory)
        with open(target, "w") as f:
            f.write(text)
        return
    _hide_path(staging)
    try:
        staged = os.path.join(staging, "resolv.conf")
        with open(staged, "w") as f:
            f.write(text)
        _mount(staged, target, None, _MS_BIND)
    finally:
        _libc_call("umount2", staging.encode(), _MNT_DETACH)


def _namespace_init(channel, interface, mtu):
    """PID 1 of the new namespaces: set them up as the tool asks, start the
    application, and serve as its init. Returns the application's status."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        _netlink_step("bring up lo", ipr.link, "set", index=1, state="up")
        interface.create(channel)
        index = ipr.link_lookup(ifname=interface.name)[0]
        _netlink_step(f"set MTU {mtu} on {interface.name}", ipr.link, "set",
                      index=index, mtu=mtu)
        _netlink_step(f"bring up {interface.name}", ipr.link, "set", index=index,
                      state="up")
        config, _ = channel.receive()
        if config is None:  # the tool gave up
            return 125
        _configure_interface(ipr, interface.name, mtu, config["addresses"],
                             config["routes"])
    if config["resolv_conf"] is not None:
        try:
            _place_resolv_conf(config["resolv_conf"])
        except OSError as e:
            raise TunnelError(f"cannot put the cloudlet's DNS in {_RESOLV_CONF}: {e}") \
                from None
    try:  # let the caller use ping(8), which has no privileges in here
        with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
            f.write(f"{os.getgid()} {os.getgid()}")
    except OSError:
        pass
    channel.send({"configured": True})
    start, _ = channel.receive()
    if start is None:
        return 125
    return _serve_as_init(channel, start)


def _serve_as_init(channel, start):
    """Start the application, then do init's job until it ends: reap every
    orphan, pass on the signals the tool forwards. The rest of the PID
    namespace dies when this returns."""
    import select
    import signal

    wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    application = os.fork()
    if application == 0:
        _exec_application(channel, start["command"], start["env"], start["terminal"])
    while True:
        readable, _, _ = select.select([channel, wakeup_r], [], [])
        if channel in readable:
            message, _ = channel.receive()
            if message is None:  # the tool is gone: so is everything here
                return 125
            try:
                os.kill(application, message["signal"])
            except ProcessLookupError:
                pass
        if wakeup_r in readable:
            os.read(wakeup_r, 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid == application:
                    return _exit_status(status)


def _exec_application(channel, command, env, terminal):
    """In the application's own process: take the terminal when the tool had
    it, restore default signal handling, exec. Never returns."""
    import signal

    status = 126
    try:
        os.setpgid(0, 0)
        if terminal is not None:
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(terminal, os.getpgrp())
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTTOU, signal.SIGPIPE, signal.SIGXFSZ,
                       signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        name = command[0]
        try:
            os.execvpe(name, command, env)
        except (FileNotFoundError, NotADirectoryError):
            status = 127
            message = f"{name}: command not found" if "/" not in name else \
                f"{name}: no such file"
        except OSError as e:
            message = f"{name}: cannot execute: {e.strerror}"
        channel.send({"error": message, "status": status})
    except BaseException as e:  # noqa: BLE001 - the parent prints it as one line
        _report_failure(channel, e)
    finally:
        os._exit(status)


def _report_failure(channel, error):
    """Tell the tool, in one line, why the namespace child gives up."""
    if isinstance(error, SinfoniaError):
        message = str(error)
    else:
        message = f"the application's namespace failed: {type(error).__name__}: {error}"
    try:
        channel.send({"error": message})
    except OSError:
        pass


def _run_namespace_child(channel, parent_pid, interface, mtu):
    """The forked child: holder of the namespaces, then (in a second fork)
    their init. Never returns."""
    status = 125
    try:
        _die_with_parent(parent_pid)
        os.setpgid(0, 0)  # out of the terminal's way: its signals go to the tool
        _enter_new_namespaces()
        init = os.fork()
        if init:
            channel.close()
            status = _exit_status(os.waitpid(init, 0)[1])
        else:
            _die_with_parent(None)  # the holder is outside our PID namespace
            status = _namespace_init(channel, interface, mtu)
    except BaseException as e:  # noqa: BLE001 - the parent prints it as one line
        _report_failure(channel, e)
    finally:
        os._exit(status)


def _foreground_terminal():
    """Our controlling terminal's descriptor when we are its foreground job."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return fd
        except OSError:
            pass
    return None


class _Namespace:
    """The application's namespaces, held by a child forked at construction.

    `interface` says how the tunnel interface gets in (`_TunInside` or
    `_LinkMovedIn`). Then: `expect()` the interface message, `configure()`,
    `start()` the application, `wait()` for its exit status; `close()` (or
    leaving the `with` block) kills whatever is left.
    """

    def __init__(self, interface, *, mtu=1420):
        self._channel, child_end = _Channel.pair()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._channel.close()
            _run_namespace_child(child_end, parent, interface, mtu)
        child_end.close()
        self.pid = pid
        self.interface = interface
        self._status = None
        self._terminal = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def send(self, message):
        self._channel.send(message)

    def expect(self, key, timeout=_SETUP_TIMEOUT):
        """The child's next message, which must carry `key`: (message, fds).
        The child's own failures arrive as its one-line TunnelError."""
        import socket

        try:
            message, fds = self._channel.receive(timeout)
        except socket.timeout:  # noqa: UP041 - not TimeoutError on 3.9
            raise TunnelError(
                f"the application's namespace was not ready within {timeout:g} s "
                "(the machine may be overloaded)") from None
        if message is None:
            status = self._reap()
            raise TunnelError(f"the application's namespace ended unexpectedly "
                              f"(status {status})")
        if "error" in message:
            self._reap()
            raise TunnelError(message["error"])
        if key not in message:
            raise TunnelError(f"the application's namespace said {message!r}, "
                              f"not {key!r}")
        return message, fds

    def configure(self, addresses, routes, resolv_conf):
        """Send the tunnel addresses and routes (networks) and the resolv.conf
        text (None: keep the host's); `expect("configured")` confirms."""
        self.send({
            "addresses": [str(address) for address in addresses],
            "routes": [str(route) for route in routes],
            "resolv_conf": resolv_conf,
        })

    def start(self, command, env):
        """Let the application run: exec `command` (found on env's PATH)."""
        self._terminal = _foreground_terminal()
        self.send({"command": list(command), "env": dict(env),
                   "terminal": self._terminal})

    def wait(self):
        """The application's exit status; SIGINT, SIGTERM and SIGHUP to the
        tool meanwhile go to the application."""
        import signal

        forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {}
        try:
            for signum in forwarded:
                previous[signum] = signal.signal(signum, self._forward)
        except ValueError:  # not the main thread: signals stay as they are
            pass
        try:
            status = self._reap()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._take_back_terminal()
        try:
            message, _ = self._channel.receive(0)
        except (BlockingIOError, OSError):
            message = None
        if message and "error" in message:
            raise _CommandError(message["error"], message.get("status", 125))
        return status

    def _forward(self, signum, frame):
        try:
            self._channel.send({"signal": signum})
        except OSError:
            pass

    def _take_back_terminal(self):
        if self._terminal is None:
            return
        import signal

        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(self._terminal, os.getpgrp())
        except OSError:
            pass
        finally:
            signal.signal(signal.SIGTTOU, previous)
            self._terminal = None

    def _reap(self):
        if self._status is None:
            self._status = _exit_status(os.waitpid(self.pid, 0)[1])
        return self._status

    def close(self):
        """Kill the namespace child if still there, and reap it (idempotent)."""
        if self._status is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            self._reap()
        self._take_back_terminal()
        self._channel.close()


def _run_application(config, keypair, command, *, env_extra, mtu=1420,
                     connect_timeout=10.0, tunnel="userspace", debug=False,
                     namespace=None):
    """Run `command` (empty: the user's shell) in its own namespaces behind the
    tunnel described by `config`; returns its exit status.

    `namespace`, when given, is a `_Namespace(_TunInside(), mtu=mtu)` forked
    earlier, so that its set-up overlapped the Tier 1 request.
    """
    if tunnel != "userspace":
        raise TunnelError(f"the {tunnel} tunnel backend is not available")
    if namespace is None:
        namespace = _Namespace(_TunInside(), mtu=mtu)
    with namespace:
        _, fds = namespace.expect("interface")
        if len(fds) != 1:
            raise TunnelError("the application's namespace sent no TUN device")
        tun_fd = fds[0]
        endpoint = f"{config.endpoint_host}:{config.endpoint_port}"
        try:
            namespace.configure(
                config.addresses,
                config.allowed_ips,
                _render_resolv_conf(config) if config.nameservers else None,
            )
            datapath = Datapath(
                tun_fd,
                keypair.private,
                config.public_key,
                endpoint=(config.endpoint_host, config.endpoint_port),
                allowed_ips=config.allowed_ips,
            )
            try:
                datapath.start()
                namespace.expect("configured")
                try:
                    datapath.wait_for_handshake(connect_timeout)
                except TunnelError:
                    raise TunnelError(
                        f"the cloudlet did not answer at its endpoint {endpoint} "
                        f"within {connect_timeout:g} s: check that UDP to it gets "
                        "through, or allow more time with --connect-timeout") from None
                env = dict(os.environ)
                env.update(env_extra)
                if not command:
                    command = [env.get("SHELL") or "/bin/sh"]
                    env["PS1"] = _SHELL_PROMPT
                namespace.start(command, env)
                return namespace.wait()
            finally:
                datapath.stop()
        finally:
            os.close(tun_fd)


# Kernel backend and root helper ##############################################


# Orchestration ###############################################################


# Command line ################################################################


def main(argv=None):
    """Entry point of the `sinfonia-tier3` script; returns the exit status."""
    print(f"sinfonia-tier3 {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
