"""Network namespaces, veth pairs, wireguard-go peers and checksummed bulk
transfers for the tests and benchmarks.

Everything here creates uniquely named objects (other people run tests on the
same machine at the same time) and removes them again on close, also when the
test fails. Traffic only ever goes to loopback or to addresses inside the
namespaces made here.

    with Namespace("a") as a, Namespace("b") as b:
        with WireguardGo(a, ["10.99.0.1/24"]) as wg_a, WireguardGo(b, ["10.99.0.2/24"]) as wg_b:
            wg_a.set_peer(wg_b.public_key, endpoint=wg_b.endpoint, allowed_ips=["10.99.0.2/32"])
            wg_b.set_peer(wg_a.public_key, endpoint=wg_a.endpoint, allowed_ips=["10.99.0.1/32"])
            exchange(b, "10.99.0.2", a, 50 << 20)

Needs root, `ip` (iproute2) and, for WireguardGo, `wireguard-go` and `wg`
(wireguard-tools); without one, a test fails naming its Debian package
(`require_programs`).
"""

import base64
import contextlib
import ctypes
import hashlib
import heapq
import ipaddress
import mmap
import os
import pickle
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

__all__ = [
    "CallerNetwork",
    "Child",
    "DelayingRelay",
    "Namespace",
    "OurDatapath",
    "Transfer",
    "WireguardGo",
    "exchange",
    "generate_keypair",
    "inside",
    "missing_programs",
    "missing_requirements",
    "move_link",
    "pattern_blocks",
    "pattern_sha256",
    "require_programs",
    "unique_name",
    "veth_pair",
]

_CLONE_NEWNET = 0x40000000
_WG_RUN_DIR = "/var/run/wireguard"


#: The Debian package of each program the tests and benchmarks check for
#: (sh, sleep, env... of the Essential coreutils, dash and bash are not
#: checked); .ci/run installs them all, and .ci/programs.md lists every program.
DEBIAN_PACKAGES = {
    "curl": "curl",
    "ip": "iproute2",
    "iperf3": "iperf3",
    "mount": "mount",
    "nsenter": "util-linux",
    "openssl": "openssl",
    "setpriv": "util-linux",
    "ss": "iproute2",
    "sudo": "sudo",
    "unshare": "util-linux",
    "useradd": "passwd",
    "wg": "wireguard-tools",
    "wg-quick": "wireguard-tools",
    "wireguard-go": "wireguard-go",
}


def missing_programs(*programs):
    """'' when every one of `programs` is on PATH, else one line naming the
    first that is not and its Debian package."""
    for program in programs:
        if shutil.which(program) is None:
            package = DEBIAN_PACKAGES.get(program, "unknown: add it to DEBIAN_PACKAGES")
            return f"{program} not found (Debian package {package})"
    return ""


def require_programs(*programs):
    """Stop unless all of `programs` are on PATH, with that one line: a test
    fails with it (an absent program is a broken set-up, not a reason to
    skip), a script such as a benchmark exits with it."""
    missing = missing_programs(*programs)
    if not missing:
        return
    if "pytest" in sys.modules:
        import pytest

        pytest.fail(missing, pytrace=False)
    raise SystemExit(f"{os.path.basename(sys.argv[0]).removesuffix('.py')}: {missing}")


def missing_requirements():
    """Why the caller cannot run here ('' when it can): root and /dev/net/tun.
    (Programs are not a reason: see `require_programs`.)"""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return ""


def unique_name(prefix):
    """`prefix` plus a random suffix, short enough for an interface name."""
    name = f"{prefix}{secrets.token_hex(4)}"
    if len(name) > 15:
        raise ValueError(f"name prefix {prefix!r} too long for an interface name")
    return name


def generate_keypair():
    """A fresh X25519 (private, public) pair, raw 32 bytes each; the private
    key clamped, as `wg genkey` makes it and the kernel reports it back."""
    from nacl.bindings import crypto_scalarmult_base

    private = bytearray(os.urandom(32))
    private[0] &= 248
    private[31] = (private[31] & 127) | 64
    return bytes(private), crypto_scalarmult_base(bytes(private))


def _b64(key):
    return base64.b64encode(key).decode()


def _run(argv, *, input=None, timeout=30, check=True):
    """Run a command, returning stdout; a failure names the command and its stderr."""
    result = subprocess.run(
        argv, input=input, capture_output=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode(errors="replace")


def _setns(fd):
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Child:
    """A forked process running a Python function inside a namespace.

    The function's return value (or exception, as text) comes back pickled
    over a pipe; `result()` waits for it, bounded by a timeout, and kills the
    child when the time is up.
    """

    def __init__(self, netns_path, function, args):
        rfd, wfd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child
            status = 1
            try:
                os.close(rfd)
                # Hold no descriptor of the parent's (TUN, sockets, pipes of
                # datapath workers) longer than the parent does.
                os.closerange(3, wfd)
                os.closerange(wfd + 1, os.sysconf("SC_OPEN_MAX"))
                if netns_path is not None:
                    fd = os.open(netns_path, os.O_RDONLY)
                    _setns(fd)
                    os.close(fd)
                try:
                    outcome = ("ok", function(*args))
                except BaseException:  # noqa: BLE001 - handed to the parent as text
                    outcome = ("error", traceback.format_exc())
                data = pickle.dumps(outcome)
                with os.fdopen(wfd, "wb") as out:
                    out.write(data)
                status = 0
            finally:
                os._exit(status)
        os.close(wfd)
        self._rfd = rfd
        self._done = False

    def result(self, timeout):
        """Wait for the function's return value; raise what it raised."""
        deadline = time.monotonic() + timeout
        chunks = []
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"child {self.pid} still running after {timeout} s"
                    )
                if select.select([self._rfd], [], [], remaining)[0]:
                    chunk = os.read(self._rfd, 1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
        finally:
            self.kill()
        if not chunks:
            raise RuntimeError(f"child {self.pid} died without a result")
        kind, value = pickle.loads(b"".join(chunks))
        if kind == "error":
            raise RuntimeError(f"in namespace child:\n{value}")
        return value

    def kill(self):
        """End the child (idempotent) and reap it."""
        if self._done:
            return
        self._done = True
        os.close(self._rfd)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


class Namespace:
    """A uniquely named network namespace with `lo` up, deleted on close.

    Processes started with `popen` and children from `fork` end with it.
    """

    def __init__(self, prefix="st3t"):
        require_programs("ip")
        self.name = unique_name(prefix)
        self.path = f"/var/run/netns/{self.name}"
        self._processes = []
        self._children = []
        _run(["ip", "netns", "add", self.name])
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Namespace({self.name!r})"

    def ip(self, *args):
        """Run `ip -n NAME ARGS...`; returns its stdout."""
        return _run(["ip", "-n", self.name, *args])

    def run(self, argv, *, timeout=30, check=True, input=None):
        """Run a command inside the namespace to completion; returns stdout."""
        return _run(
            ["ip", "netns", "exec", self.name, *argv],
            input=input,
            timeout=timeout,
            check=check,
        )

    def popen(self, argv, **kwargs):
        """Start a command inside the namespace; it is killed on close."""
        process = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)
        self._processes.append(process)
        return process

    def fork(self, function, *args):
        """Run `function(*args)` in a forked child inside the namespace."""
        child = Child(self.path, function, args)
        self._children.append(child)
        return child

    def add_addresses(self, device, addresses, *, mtu=None):
        """Give `device` (already in this namespace) its addresses and bring it up."""
        for address in addresses:
            interface = ipaddress.ip_interface(address)
            extra = ["nodad"] if interface.version == 6 else []
            self.ip("addr", "add", str(interface), "dev", device, *extra)
        if mtu is not None:
            self.ip("link", "set", device, "mtu", str(mtu))
        self.ip("link", "set", device, "up")

    def close(self):
        """Kill what runs inside and delete the namespace (idempotent)."""
        for child in self._children:
            child.kill()
        self._children.clear()
        for process in self._processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        self._processes.clear()
        if os.path.exists(self.path):
            _run(["ip", "netns", "del", self.name], check=False)


@contextlib.contextmanager
def inside(namespace):
    """The calling thread in `namespace`'s network while inside: sockets made
    then (servers, threads started meanwhile) stay there; back home after."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(namespace.path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


class DelayingRelay:
    """A UDP relay on loopback that holds every datagram `delay` seconds
    each way before passing it on to `target` (host, port) or back to the
    last sender: a slow path where the kernel has no netem. Serves one
    client; `endpoint` is its "127.0.0.1:port"."""

    def __init__(self, target, delay):
        self.delay = delay
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.connect(target)
        self.endpoint = f"127.0.0.1:{self.front.getsockname()[1]}"
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._relay, name="relay", daemon=True)
        self._thread.start()

    def _relay(self):
        client, due, order = None, [], 0  # due: (time, order, datagram, toward the target)
        while True:
            timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
            readable = select.select([self.front, self.back, self._stop_r], [], [], timeout)[0]
            if self._stop_r in readable:
                return
            for sock in readable:
                try:
                    datagram, source = sock.recvfrom(65536)
                except OSError:
                    continue
                if sock is self.front:
                    client = source
                order += 1
                heapq.heappush(due, (time.monotonic() + self.delay, order, datagram,
                                     sock is self.front))
            while due and due[0][0] <= time.monotonic():
                _, _, datagram, forward = heapq.heappop(due)
                try:
                    if forward:
                        self.back.send(datagram)
                    elif client is not None:
                        self.front.sendto(datagram, client)
                except OSError:
                    pass

    def close(self):
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self.front.close()
        self.back.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def move_link(device, namespace):
    """Move `device` from the host namespace into `namespace`.

    File descriptors of a TUN device stay valid: open the TUN here and hand
    the device to the namespace.
    """
    _run(["ip", "link", "set", "dev", device, "netns", namespace.name])


def veth_pair(ns_a, ns_b, addresses_a=(), addresses_b=(), *, mtu=None):
    """A veth pair with one end in each namespace, addressed and up.

    Returns the two device names. The pair goes when either namespace is
    deleted.
    """
    name_a, name_b = unique_name("st3va"), unique_name("st3vb")
    _run(["ip", "link", "add", name_a, "type", "veth", "peer", "name", name_b])
    try:
        move_link(name_a, ns_a)
        move_link(name_b, ns_b)
    except BaseException:
        _run(["ip", "link", "del", name_a], check=False)
        raise
    ns_a.add_addresses(name_a, addresses_a, mtu=mtu)
    ns_b.add_addresses(name_b, addresses_b, mtu=mtu)
    return name_a, name_b


class WireguardGo:
    """wireguard-go as an independent WireGuard peer.

    The process runs in the host namespace, so its UDP socket is on the host's
    loopback next to ours; its TUN device is moved into `namespace` and given
    `addresses` there. The configuration is kept, so `restart()` brings up
    the same peer again (same key, same port, same peers).
    """

    def __init__(
        self,
        namespace,
        addresses=(),
        *,
        private_key=None,
        listen_port=0,
        mtu=1420,
        log_level="error",
    ):
        self.namespace = namespace
        self.addresses = tuple(addresses)
        self.mtu = mtu
        self.name = unique_name("st3wg")
        if private_key is None:
            private_key, _ = generate_keypair()
        from nacl.public import PrivateKey

        self.private_key = private_key
        self.public_key = bytes(PrivateKey(private_key).public_key)
        self.listen_port = listen_port
        self._log_level = log_level
        self._peers = {}
        self._process = None
        self._log = None
        self.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def endpoint(self):
        """Where our side reaches it: ("127.0.0.1", port)."""
        return ("127.0.0.1", self.listen_port)

    @property
    def pid(self):
        return self._process.pid

    @property
    def running(self):
        return self._process is not None and self._process.poll() is None

    def start(self):
        """Launch the process and apply the kept configuration."""
        import tempfile

        require_programs("wireguard-go", "wg")
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as self
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL=self._log_level)
        self._process = subprocess.Popen(
            ["wireguard-go", "-f", self.name],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_for_socket(5.0)
            self._wg(
                "set",
                self.name,
                "private-key",
                "/dev/stdin",
                "listen-port",
                str(self.listen_port),
                input=_b64(self.private_key).encode(),
            )
            self.listen_port = int(self._wg("show", self.name, "listen-port"))
            for public_key, settings in self._peers.items():
                self._apply_peer(public_key, settings)
            move_link(self.name, self.namespace)
            self.namespace.add_addresses(self.name, self.addresses, mtu=self.mtu)
        except BaseException:
            self.stop()
            raise

    def _wait_for_socket(self, timeout):
        path = f"{_WG_RUN_DIR}/{self.name}.sock"
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"wireguard-go exited {self._process.returncode}: {self.log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"wireguard-go made no control socket in {timeout} s"
                )
            time.sleep(0.01)

    def _wg(self, *args, input=None):
        return _run(["wg", *args], input=input).strip()

    def set_peer(
        self,
        public_key,
        *,
        endpoint=None,
        allowed_ips=(),
        preshared_key=None,
        persistent_keepalive=0,
    ):
        """Add or replace a peer; `endpoint` is (host, port)."""
        settings = {
            "endpoint": endpoint,
            "allowed_ips": tuple(allowed_ips),
            "preshared_key": preshared_key,
            "persistent_keepalive": persistent_keepalive,
        }
        self._peers[public_key] = settings
        self._apply_peer(public_key, settings)

    def _apply_peer(self, public_key, settings):
        argv = [
            "set",
            self.name,
            "peer",
            _b64(public_key),
            "persistent-keepalive",
            str(settings["persistent_keepalive"] or "off"),
            "allowed-ips",
            ",".join(str(n) for n in settings["allowed_ips"]),
        ]
        if settings["endpoint"] is not None:
            host, port = settings["endpoint"]
            host = f"[{host}]" if ":" in host else host
            argv += ["endpoint", f"{host}:{port}"]
        if settings["preshared_key"] is not None:
            argv += ["preshared-key", "/dev/stdin"]
            self._wg(*argv, input=_b64(settings["preshared_key"]).encode())
        else:
            self._wg(*argv)

    def latest_handshake(self, public_key):
        """Epoch seconds of the last handshake with that peer, 0 when none."""
        for line in self._wg("show", self.name, "latest-handshakes").splitlines():
            key, _, when = line.partition("\t")
            if key == _b64(public_key):
                return int(when)
        raise KeyError("no such peer")

    def transfer(self, public_key):
        """(received, sent) bytes to and from that peer."""
        for line in self._wg("show", self.name, "transfer").splitlines():
            key, rx, tx = line.split("\t")
            if key == _b64(public_key):
                return int(rx), int(tx)
        raise KeyError("no such peer")

    def log(self):
        """What wireguard-go printed so far (for failure messages)."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self):
        """End the process (idempotent); its TUN device goes with it."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        try:
            os.unlink(f"{_WG_RUN_DIR}/{self.name}.sock")
        except FileNotFoundError:
            pass

    def restart(self):
        """Kill the process without warning and start it again."""
        self._process.kill()
        self._process.wait()
        self.stop()
        self.start()


class OurDatapath:
    """sinfonia_tier3.Datapath with its TUN device in `namespace` (addressed,
    up) and its UDP socket on the host's loopback.

    Construction binds the socket, so `endpoint` is known before `start()`:
    a responder's peer can be told where to find it.
    """

    def __init__(
        self,
        namespace,
        addresses,
        private_key,
        peer_public_key,
        *,
        mtu=1420,
        vnet_hdr=False,
        **options,
    ):
        import sinfonia_tier3 as st3

        self.name = unique_name("st3tun")
        self.tun_fd = st3._open_tun(self.name, vnet_hdr=vnet_hdr)
        self.datapath = None
        try:
            move_link(self.name, namespace)
            namespace.add_addresses(self.name, addresses, mtu=mtu)
            options.setdefault("listen", ("127.0.0.1", 0))
            self._listen_host = options["listen"][0]
            self.datapath = st3.Datapath(
                self.tun_fd, private_key, peer_public_key, vnet_hdr=vnet_hdr, **options
            )
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def endpoint(self):
        """Where the peer reaches it: (listen host, bound port)."""
        return (self._listen_host, self.datapath.listen_port)

    def start(self):
        self.datapath.start()

    def close(self):
        """Stop the datapath, then close the TUN fd, which deletes the device."""
        try:
            if self.datapath is not None:
                self.datapath.stop()
        finally:
            if self.tun_fd is not None:
                os.close(self.tun_fd)
                self.tun_fd = None


# Checksummed bulk transfer ####################################################

_BLOCK = 1 << 16
_PATTERN = hashlib.shake_256(b"sinfonia-tier3 interop pattern").digest(2 * _BLOCK)


def pattern_blocks(size):
    """The deterministic stream: numbered 64 KiB blocks of shifting bytes, so
    lost, repeated or reordered data changes the checksum."""
    index = 0
    while size > 0:
        offset = (index * 7919) % _BLOCK
        block = struct.pack(">Q", index) + _PATTERN[offset : offset + _BLOCK - 8]
        yield block[:size]
        size -= len(block)
        index += 1


def pattern_sha256(size):
    """The sha256 of the first `size` bytes of the pattern stream."""
    digest = hashlib.sha256()
    for block in pattern_blocks(size):
        digest.update(block)
    return digest.hexdigest()


def _send_and_receive(sock, size, counters, slot, timeout):
    """Send `size` pattern bytes while receiving as many; sha256 of what came."""
    sock.settimeout(timeout)
    failure = []

    def send():
        try:
            for block in pattern_blocks(size):
                sock.sendall(block)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            failure.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    digest = hashlib.sha256()
    received = 0
    buffer = bytearray(1 << 18)
    while True:
        n = sock.recv_into(buffer)
        if not n:
            break
        digest.update(memoryview(buffer)[:n])
        received += n
        struct.pack_into("Q", counters, slot, received)
    sender.join(timeout)
    if failure:
        raise failure[0]
    if sender.is_alive():
        raise TimeoutError("sending did not finish")
    return received, digest.hexdigest()


def _serve_once(address, port, size, counters, timeout):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(1)
        listener.settimeout(timeout)
        conn, _ = listener.accept()
    with conn:
        return _send_and_receive(conn, size, counters, 0, timeout)


def _connect_and_exchange(address, port, size, counters, timeout):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    deadline = time.monotonic() + timeout
    while True:  # the far side's address may still be settling (DAD, routes)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            sock.connect((address, port))
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with sock:
        return _send_and_receive(sock, size, counters, 8, timeout)


class Transfer:
    """Two forked processes sending `size` pattern bytes to each other over
    TCP, one in each namespace, each checksumming what it receives.

    `progress()` tells how far both have got, so a test can act mid-transfer;
    `wait()` raises AssertionError unless both streams arrived whole.
    """

    def __init__(
        self, server_ns, server_address, client_ns, size, *, port=7777, timeout=60
    ):
        self.size = size
        self.timeout = timeout
        self._counters = mmap.mmap(-1, 16)  # anonymous, shared with the children
        self._server = server_ns.fork(
            _serve_once, server_address, port, size, self._counters, timeout
        )
        self._client = client_ns.fork(
            _connect_and_exchange, server_address, port, size, self._counters, timeout
        )

    def progress(self):
        """Bytes received so far by (server, client)."""
        return struct.unpack("QQ", self._counters[:16])

    def wait_until(self, received, timeout):
        """Block until both sides have received at least `received` bytes."""
        deadline = time.monotonic() + timeout
        while min(self.progress()) < received:
            if time.monotonic() > deadline:
                raise TimeoutError(f"transfer stalled at {self.progress()} bytes")
            time.sleep(0.02)

    def wait(self):
        """Both directions complete and intact, or AssertionError."""
        try:
            client = self._client.result(self.timeout + 5)
            server = self._server.result(self.timeout + 5)
        finally:
            self._client.kill()
            self._server.kill()
        expected = (self.size, pattern_sha256(self.size))
        assert server == expected, f"server received {server}, expected {expected}"
        assert client == expected, f"client received {client}, expected {expected}"


def exchange(server_ns, server_address, client_ns, size, *, timeout=60):
    """Send `size` bytes each way between the namespaces and verify them."""
    Transfer(server_ns, server_address, client_ns, size, timeout=timeout).wait()


class CallerNetwork:
    """A namespace for the tool, joined to this one by a veth pair: this
    side is 10.97.0.1/24 (where a cloudlet may listen), the namespace's side
    10.97.0.2/24 with its default route here. `readdress()` moves the
    namespace's side to the other of 10.97.0.2 and .3, as a caller whose
    address changes. `prefix` runs a command inside."""

    HOST = "10.97.0.1"

    def __init__(self):
        self.namespace = Namespace("st3cn")
        self.outside, self.inside = unique_name("st3co"), unique_name("st3ci")
        try:
            _run(["ip", "link", "add", self.outside, "type", "veth", "peer", "name",
                  self.inside, "netns", self.namespace.name])
            _run(["ip", "address", "add", f"{self.HOST}/24", "dev", self.outside])
            _run(["ip", "link", "set", self.outside, "up"])
            # The new address stays when the old one goes (by default the
            # kernel removes an address's secondaries with it).
            setting = f"/proc/sys/net/ipv4/conf/{self.inside}/promote_secondaries"
            self.namespace.run(["sh", "-c", f"echo 1 > {setting}"])
            self.address = "10.97.0.2/24"
            self.namespace.add_addresses(self.inside, [self.address])
            self.namespace.ip("route", "add", "default", "via", self.HOST)
        except BaseException:
            self.close()
            raise
        self.prefix = ["ip", "netns", "exec", self.namespace.name]

    def readdress(self):
        new = "10.97.0.3/24" if self.address == "10.97.0.2/24" else "10.97.0.2/24"
        self.namespace.ip("address", "add", new, "dev", self.inside)
        self.namespace.ip("address", "del", self.address, "dev", self.inside)
        self.address = new

    def close(self):
        """Delete the namespace, and with it the pair (or this side of it)."""
        self.namespace.close()
        _run(["ip", "link", "del", self.outside], check=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
