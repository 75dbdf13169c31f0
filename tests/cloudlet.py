"""A test cloudlet: the deploy API of a Sinfonia Tier 1 / Tier 2 on loopback.

It answers `POST /api/v1/deploy/{uuid}/{key}` as DESIGN §2 describes (the
same key and uuid get the same deployment; an unknown uuid gets a 404
problem+json; a malformed key or uuid a 400), and `GET` / `DELETE` on the same
path as a Tier 2 does. Setting `misbehaviour` to one of MISBEHAVIOURS turns it
into one kind of hostile server; `rewrite` edits the deployments it sends, for
tests of single fields.

The WireGuard side is pluggable: for each new deployment the cloudlet asks
`wireguard.tunnel_config_for(uuid, client_public_key)` (the key as 32 bytes)
for its TunnelConfig dict. The default, StaticWireGuard, returns a valid
configuration whose endpoint is a loopback port nobody listens on; pass
`Cloudlet(wireguard=...)` an object with the same method (a real WireGuard
peer, a backend behind it) where a tunnel must come up.

    python3 tests/cloudlet.py serve [--port N] [--misbehave NAME]
                                    [--wireguard sinfonia|wireguard-go]
    python3 tests/cloudlet.py demo [--wireguard wireguard-go]

`WireGuardServer` (section "WireGuard server, backend and DNS") is the real
WireGuard side: a namespace made without root with the `helloworld` backend and
the cluster DNS in it, and one WireGuard responder per client key. `demo` runs
sinfonia-tier3 with `curl http://helloworld/` through it, in one command.
"""

import argparse
import base64
import binascii
import contextlib
import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid as uuidlib

from checkout import REPO
from netns import DelayingRelay, generate_keypair, pattern_blocks
from sessions import tun_closed

HELLOWORLD = "00000000-0000-0000-0000-000000000000"
SLOW_LIMIT = 120.0  # seconds: the longest any deliberately slow answer lasts


def unused_udp_port(host="127.0.0.1"):
    """A UDP port that nothing was bound to a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class StaticWireGuard:
    """Hands out syntactically valid tunnel configurations; no WireGuard
    server answers behind them."""

    def __init__(self, endpoint=None):
        self.private_key, self.public_key = generate_keypair()
        self.endpoint = endpoint or f"127.0.0.1:{unused_udp_port()}"
        self._next_host = 2
        self._lock = threading.Lock()

    def release(self, client_public_key):
        """Nothing serves the peer: nothing to stop."""

    def restart(self):
        self.private_key, self.public_key = generate_keypair()

    def tunnel_config_for(self, uuid, client_public_key):
        with self._lock:
            host = self._next_host
            self._next_host += 1
        return {
            "publicKey": base64.b64encode(self.public_key).decode(),
            "allowedIPs": ["10.0.0.0/16", "10.43.0.0/16"],
            "endpoint": self.endpoint,
            "address": [f"10.0.{host // 256}.{host % 256}/32"],
            "dns": [
                "10.43.0.10",
                f"app-{uuid[:8]}.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
            ],
        }


def parse_key(text):
    """32 key bytes from standard or URL-safe base64 with or without padding,
    as the upstream servers accept it; None if malformed."""
    text = text.replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == 32 else None


def problem(status, title, detail):
    """An application/problem+json answer."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return status, "application/problem+json", json.dumps(body).encode()


# Each misbehaviour is a way a real server, proxy or network can answer.
MISBEHAVIOURS = {
    "close": "close the connection without answering",
    "garbage": "answer with bytes that are not HTTP",
    "redirect": "302 to another URL",
    "html": "200 with an HTML page",
    "text": "200 with plain text",
    "html-error": "502 with a proxy's HTML error page",
    "text-error": "503 with a plain text error",
    "problem": "500 problem+json with a long detail full of control characters",
    "truncated": "200 with JSON cut off half way",
    "short-body": "200 announcing more bytes than it sends, then closing",
    "wrong-type": "200 with a JSON object instead of a list",
    "empty-list": "200 with an empty list",
    "empty-body": "200 with no body at all",
    "not-utf8": "200 application/json whose bytes are not UTF-8",
    "huge": "200 with a 2 MiB body and an honest Content-Length",
    "huge-unannounced": "200 streaming 2 MiB without a Content-Length",
    "long-length": "200 whose Content-Length has 5000 digits",
    "odd-length": "200 whose Content-Length is a superscript digit, then closing",
    "endless": "200 dripping a byte every 50 ms, never ending",
    "slow-headers": "accept the connection and say nothing",
}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that hangs up on a hostile answer is expected, not news."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Cloudlet:
    """The deploy API on a loopback port, in a background thread."""

    def __init__(
        self, wireguard=None, backends=(HELLOWORLD,), host="127.0.0.1", port=0, tls=None
    ):
        """`tls`: (certificate file, key file) to serve HTTPS instead of HTTP."""
        self.wireguard = wireguard or StaticWireGuard()
        self.backends = set(backends)
        self.misbehaviour = None  # a key of MISBEHAVIOURS, or None to behave
        self.rewrite = None  # callable(list of deployment dicts) -> JSON value
        self.requests = []  # (method, path, headers) of every request
        self._deployments = {}  # (uuid, key bytes) -> deployment dict
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server((host, port), self._handler_class())
        self.scheme = "https" if tls else "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True
            )
        self._thread = None

    @property
    def url(self):
        host, port = self._server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def start(self):
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cloudlet", daemon=True
        )
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # The API ------------------------------------------------------------

    def answer(self, method, path, query):
        """(status, content type, body bytes) for a well-behaved server."""
        parts = path.strip("/").split("/")
        if parts[:3] != ["api", "v1", "deploy"] or len(parts) != 5:
            return problem(404, "Not Found", f"no such path: {path}")
        try:
            uuid = str(uuidlib.UUID(parts[3]))
        except ValueError:
            return problem(400, "Bad Request", f"{parts[3]!r} is not a uuid")
        key = parse_key(parts[4])
        if key is None:
            return problem(400, "Bad Request", f"{parts[4]!r} is not a WireGuard key")
        results = query.get("results", ["1"])[-1]
        if not results.isdigit() or int(results) < 1:
            return problem(400, "Bad Request", f"results={results!r} is not >= 1")
        if uuid not in self.backends:
            return problem(404, "Not Found", f"no backend {uuid} on this cloudlet")
        with self._lock:
            existing = self._deployments.get((uuid, key))
            if method == "DELETE":  # as an expiry does: the peer goes too
                self._deployments.pop((uuid, key), None)
                self.wireguard.release(key)
                return 204, "", b""
            if method == "GET" and existing is None:
                return problem(404, "Not Found", "no such deployment")
            if existing is None:
                existing = self._deployments[(uuid, key)] = self._new_deployment(
                    uuid, key
                )
        deployments = [existing]
        if self.rewrite is not None:
            deployments = self.rewrite(json.loads(json.dumps(deployments)))
        return 200, "application/json", json.dumps(deployments).encode()

    def expire_all(self):
        """DELETE every deployment through the API, as a Tier 2's expiry ends it."""
        with self._lock:
            keys = list(self._deployments)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for uuid, key in keys:
            key_text = base64.urlsafe_b64encode(key).decode().rstrip("=")
            request = urllib.request.Request(
                f"{self.url}/api/v1/deploy/{uuid}/{key_text}", method="DELETE"
            )
            with opener.open(request, timeout=10) as answer:
                if answer.status != 204:
                    raise RuntimeError(f"DELETE answered {answer.status}")

    def restart(self):
        """Come back as a cloudlet that remembers nothing and has a new
        WireGuard key (same URL): every deployment and peer is gone."""
        with self._lock:
            self._deployments.clear()
        self.wireguard.restart()

    def _new_deployment(self, uuid, key):
        name = "helloworld" if uuid == HELLOWORLD else f"app-{uuid[:8]}"
        return {
            "UUID": uuid,
            "ApplicationKey": base64.b64encode(key).decode(),
            "Status": "Deployed",
            "DeploymentName": f"{name}-{hashlib.sha256(key).hexdigest()[:8]}",
            "Created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "TunnelConfig": self.wireguard.tunnel_config_for(uuid, key),
        }

    # HTTP ---------------------------------------------------------------

    def _handler_class(self):
        cloudlet = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "sinfonia-test-cloudlet/1"

            def log_message(self, format, *args):
                pass

            def do_POST(self):
                self.handle_api("POST")

            def do_GET(self):
                self.handle_api("GET")

            def do_DELETE(self):
                self.handle_api("DELETE")

            def handle_api(self, method):
                url = urllib.parse.urlsplit(self.path)
                cloudlet.requests.append((method, self.path, dict(self.headers)))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(min(length, 65536))
                status, content_type, body = cloudlet.answer(
                    method, url.path, urllib.parse.parse_qs(url.query)
                )
                if cloudlet.misbehaviour and method == "POST":
                    cloudlet._misbehave(self, cloudlet.misbehaviour, body)
                else:
                    self.send(status, content_type, body)

            def send(self, status, content_type, body, length=None):
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header(
                    "Content-Length", str(len(body) if length is None else length)
                )
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def _misbehave(self, handler, name, good_body):
        """Answer through `handler` the way misbehaviour `name` says."""
        send = handler.send
        if name == "close":
            handler.close_connection = True
        elif name == "garbage":
            handler.wfile.write(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff\xfe")
        elif name == "redirect":
            handler.send_response(302)
            handler.send_header("Location", "https://elsewhere.invalid/api/v1/deploy")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        elif name == "html":
            send(
                200,
                "text/html",
                b"<html><body><h1>Welcome to nginx!</h1></body></html>",
            )
        elif name == "text":
            send(200, "text/plain", b"deployment queued, try again later\n")
        elif name == "html-error":
            page = b"<html><head><title>502 Bad Gateway</title></head><body>oops</body></html>"
            send(502, "text/html", page)
        elif name == "text-error":
            send(503, "text/plain", b"upstream connect error\nline two\n")
        elif name == "problem":
            detail = "Something \x1b[31mwent\x1b[0m wrong\r\n\x07" + "x" * 5000
            send(*problem(500, "Internal Server Error", detail))
        elif name == "truncated":
            send(200, "application/json", good_body[: len(good_body) // 2])
        elif name == "short-body":
            send(200, "application/json", good_body[:100], length=len(good_body))
        elif name == "wrong-type":
            send(200, "application/json", json.dumps({"deployments": []}).encode())
        elif name == "empty-list":
            send(200, "application/json", b"[]")
        elif name == "empty-body":
            send(200, "application/json", b"")
        elif name == "not-utf8":
            send(200, "application/json", b'["\xff\xfe\xfa"]')
        elif name == "huge":
            send(200, "application/json", b"[" + b" " * (2 << 20) + b"]")
        elif name == "long-length":
            send(200, "application/json", good_body, length="9" * 5000)
        elif name == "odd-length":
            handler.close_connection = True
            send(200, "application/json", good_body, length="\u00b2")
        elif name == "huge-unannounced":
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.end_headers()
            handler.close_connection = True
            handler.wfile.write(b"[")
            for _ in range(32):
                handler.wfile.write(b" " * 65536)
        elif name == "endless":
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.end_headers()
            handler.close_connection = True
            handler.wfile.write(b"[")
            deadline = time.monotonic() + SLOW_LIMIT
            while time.monotonic() < deadline and not self._stopping.wait(0.05):
                handler.wfile.write(b" ")
                handler.wfile.flush()
        elif name == "slow-headers":
            self._stopping.wait(SLOW_LIMIT)
            handler.close_connection = True
        else:
            raise ValueError(f"unknown misbehaviour {name!r}")


# WireGuard server, backend and DNS ###########################################
#
# The cloudlet's network lives in a user + network namespace this file creates
# without root: a child process unshares, brings up `lo` with the cloudlet's
# service addresses, serves the `helloworld` backend and the cluster DNS there,
# and creates one TUN device per client whose file descriptor it hands back over
# SCM_RIGHTS. In the caller's namespace one WireGuard responder per client (our
# own `sinfonia_tier3.Datapath`, or wireguard-go on request) joins that TUN to a
# UDP port on 127.0.0.1, which the deploy answer names as the endpoint.


def _tool():
    """This checkout's sinfonia_tier3 module, whose pieces the cloudlet borrows."""
    import sinfonia_tier3

    return sinfonia_tier3


CLOUDLET_ADDRESS = ipaddress.ip_address("10.43.0.1")
DNS_ADDRESS = ipaddress.ip_address("10.43.0.10")
HELLOWORLD_ADDRESS = ipaddress.ip_address("10.43.0.20")
CLOUDLET_NETWORK = ipaddress.ip_network("10.43.0.0/16")
CLIENT_NETWORK = ipaddress.ip_network("10.44.0.0/16")
KUBERNETES_NAMESPACE = "helloworld"
SEARCH_DOMAINS = (
    f"{KUBERNETES_NAMESPACE}.svc.cluster.local",
    "svc.cluster.local",
    "cluster.local",
)
TUNNEL_MTU = 1420
PATTERN_LIMIT = 64 << 20

_DNS_TTL = 5
_DNS_A, _DNS_ANY, _DNS_IN = 1, 255, 1
_DNS_FORMERR, _DNS_NXDOMAIN, _DNS_NOTIMP, _DNS_REFUSED = 1, 3, 4, 5


def _service_names(service, namespace):
    """Every name a pod in `namespace` may use for `service` (search list applied)."""
    return (
        f"{service}.{namespace}.svc.cluster.local",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}",
    ) + ((service,) if namespace == KUBERNETES_NAMESPACE else ())


def cluster_records():
    """The cloudlet's DNS zone: lower-case name (bytes) -> IPv4 address."""
    records = {}
    for name in _service_names("helloworld", KUBERNETES_NAMESPACE):
        records[name.encode()] = HELLOWORLD_ADDRESS
    for name in _service_names("kube-dns", "kube-system"):
        records[name.encode()] = DNS_ADDRESS
    return records


def dns_answer(query, records):
    """The reply to one DNS query datagram, or None when it must be dropped.

    Answers A (and ANY) from `records`, an empty answer for other types of a
    known name, NXDOMAIN for unknown names. Everything in `query` is untrusted:
    malformed queries get FORMERR, never an exception.
    """
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack_from("!HHH", query)
    if flags & 0x8000:  # a response: answering it could start a loop
        return None
    opcode = flags & 0x7800
    reply_flags = 0x8000 | opcode | 0x0400 | (flags & 0x0100)  # QR, AA, RD copied

    def reply(rcode, question=b"", answer=b""):
        header = struct.pack(
            "!6H",
            ident,
            reply_flags | rcode,
            1 if question else 0,
            1 if answer else 0,
            0,
            0,
        )
        return header + question + answer

    if opcode:
        return reply(_DNS_NOTIMP)
    if qdcount != 1:
        return reply(_DNS_FORMERR)
    labels, offset = [], 12
    while True:
        if offset >= len(query):
            return reply(_DNS_FORMERR)
        length = query[offset]
        offset += 1
        if length == 0:
            break
        # > 63 also refuses compression pointers, which a question never needs.
        if length > 63 or offset + length > len(query) or offset - 12 + length > 254:
            return reply(_DNS_FORMERR)
        labels.append(query[offset : offset + length])
        offset += length
    if offset + 4 > len(query):
        return reply(_DNS_FORMERR)
    qtype, qclass = struct.unpack_from("!HH", query, offset)
    question = query[12 : offset + 4]
    if qclass != _DNS_IN:
        return reply(_DNS_REFUSED, question)
    address = records.get(b".".join(labels).lower())
    if address is None:
        return reply(_DNS_NXDOMAIN, question)
    if qtype not in (_DNS_A, _DNS_ANY):
        return reply(0, question)
    answer = (
        struct.pack("!HHHIH", 0xC00C, _DNS_A, _DNS_IN, _DNS_TTL, 4) + address.packed
    )
    return reply(0, question, answer)


def serve_dns(sock, records):
    """Answer DNS queries on the bound UDP `sock` until it is shut down."""
    while True:
        try:
            query, peer = sock.recvfrom(4096)
        except OSError:
            return
        if peer is None:  # shutdown() woke us up
            return
        answer = dns_answer(query, records)
        if answer is not None:
            try:
                sock.sendto(answer, peer)
            except OSError:
                pass


class HelloWorldHandler(http.server.BaseHTTPRequestHandler):
    """The `helloworld` backend: a page that tells the client its tunnel
    address; /pattern/N: the first N bytes of tests/netns.py's pattern
    stream (at most PATTERN_LIMIT), for checksummed downloads."""

    server_version = "sinfonia-test-cloudlet"

    def do_GET(self):
        size = self.path[len("/pattern/") :]
        if self.path.startswith("/pattern/") and size.isdigit():
            size = min(int(size), PATTERN_LIMIT)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for block in pattern_blocks(size):
                self.wfile.write(block)
            return
        body = (
            "Hello from the sinfonia test cloudlet!\n"
            f"Your tunnel address is {self.client_address[0]}.\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def _enter_new_namespaces():
    """Become root of a new user + network namespace owned by our own uid.

    Not the tool's `sinfonia_tier3._enter_new_namespaces`: that one also
    unshares the PID namespace, after which a process cannot start threads,
    and the cloudlet's services are threads. The pieces are the tool's.
    """
    tool = _tool()
    uid, gid = os.getuid(), os.getgid()
    try:
        tool._unshare(tool._CLONE_NEWUSER | tool._CLONE_NEWNET)
        for name, text in [
            ("setgroups", "deny"),
            ("uid_map", f"0 {uid} 1"),
            ("gid_map", f"0 {gid} 1"),
        ]:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError as e:
        raise RuntimeError(tool._explain_userns_failure(e)) from None


def _check_tun_opens():
    """Fail now, with what to do, where this user may not open /dev/net/tun
    (mode 0600 on some distributions): every client's tunnel needs a TUN
    device, and finding out at the first deployment is too late to say so."""
    closed = tun_closed()
    if closed:
        raise RuntimeError(f"{closed}: {_tool()._tun_advice()}")


def _open_tun_with_packet_info(name):
    """A TUN device whose packets carry the 4-byte packet information header.

    The wireguard-go build of wireguard4netns expects that header on a TUN fd
    it inherits; `sinfonia_tier3._open_tun` (rightly) never sets it.
    """
    import fcntl

    tool = _tool()
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(
            fd, tool._TUNSETIFF, struct.pack("16sH", name.encode(), tool._IFF_TUN)
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _namespace_child(control_fd, parent_pid):
    """Body of the cloudlet's namespace process; serves until `control_fd` closes.

    Requests on the control socket (JSON, one per datagram):
    {"tun": NAME, "client": ADDRESS, "packet_info": BOOL} -> a TUN device routed
    to ADDRESS, its fd passed back with {"ok": true};
    {"listen": PORT} -> a TCP port of the helloworld address that accepts
    connections from now on, {"ok": true}; {"socket": "tcp"} -> a
    new TCP socket of the namespace, for a test to connect from in here (a
    backend calling the client); any failure is {"error": MESSAGE}.
    """
    _tool()._die_with_parent(parent_pid)
    control = socket.socket(fileno=control_fd)
    try:
        _enter_new_namespaces()
        _check_tun_opens()
        from pyroute2 import IPRoute

        ipr = IPRoute()
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        for address in (CLOUDLET_ADDRESS, DNS_ADDRESS, HELLOWORLD_ADDRESS):
            ipr.addr("add", index=lo, address=str(address), prefixlen=32)
        dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns.bind((str(DNS_ADDRESS), 53))
        threading.Thread(
            target=serve_dns, args=(dns, cluster_records()), daemon=True
        ).start()
        web = http.server.ThreadingHTTPServer(
            (str(HELLOWORLD_ADDRESS), 80), HelloWorldHandler
        )
        web.daemon_threads = True
        threading.Thread(target=web.serve_forever, daemon=True).start()
    except Exception as e:  # noqa: BLE001 - any failure goes to the parent, which raises it
        control.send(json.dumps({"error": f"cloudlet namespace: {e}"}).encode())
        return
    control.send(json.dumps({"ok": True, "pid": os.getpid()}).encode())
    listeners = []
    while True:
        request = control.recv(4096)
        if not request:
            return
        try:
            request = json.loads(request)
            if "listen" in request:
                listener = socket.create_server((str(HELLOWORLD_ADDRESS), request["listen"]))
                listeners.append(listener)  # the kernel accepts into its backlog
                control.send(json.dumps({"ok": True}).encode())
                continue
            if request.get("socket") == "tcp":
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as made:
                    socket.send_fds(control, [json.dumps({"ok": True}).encode()],
                                    [made.fileno()])
                continue
            name, client = str(request["tun"]), ipaddress.ip_address(request["client"])
            if request.get("packet_info"):
                fd = _open_tun_with_packet_info(name)
            else:
                fd = _tool()._open_tun(name)
            try:
                index = ipr.link_lookup(ifname=name)[0]
                ipr.link("set", index=index, state="up", mtu=TUNNEL_MTU)
                ipr.route("add", dst=f"{client}/{client.max_prefixlen}", oif=index)
                socket.send_fds(control, [json.dumps({"ok": True}).encode()], [fd])
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            control.send(json.dumps({"error": f"cloudlet TUN: {e}"}).encode())


class CloudletNamespace:
    """The cloudlet's own namespace (created without root) and its services."""

    def __init__(self, timeout=60.0):
        # 60 s: under the kernel tests' emulated guest, the child's first start
        # (compiling this file and the tool, importing their helpers) took
        # more than 10 s.
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control = parent
        self._lock = threading.Lock()
        boot = (
            "import importlib.util, os, sys\n"
            "sys.path.insert(0, os.path.dirname(sys.argv[1]))  # tests/, for checkout\n"
            "spec = importlib.util.spec_from_file_location('_cloudlet', sys.argv[1])\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "module._namespace_child(int(sys.argv[2]), int(sys.argv[3]))\n"
        )
        with child:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    boot,
                    os.path.abspath(__file__),
                    str(child.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=[child.fileno()],
            )
        try:
            parent.settimeout(timeout)
            self.pid = self._reply(parent.recv(4096))["pid"]
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _reply(message):
        if not message:
            raise RuntimeError("cloudlet namespace process died")
        message = json.loads(message)
        if "error" in message:
            raise RuntimeError(message["error"])
        return message

    def open_tun(self, name, client_address, packet_info=False):
        """A new TUN device `name` in the namespace, routed to `client_address`."""
        return self._descriptor(
            {"tun": name, "client": str(client_address), "packet_info": packet_info})

    def tcp_socket(self):
        """A TCP socket made in the namespace: what it connects to is
        reached from the cloudlet's side, as a backend would reach it."""
        return socket.socket(fileno=self._descriptor({"socket": "tcp"}))

    def _descriptor(self, request):
        request = json.dumps(request).encode()
        with self._lock:
            self._control.send(request)
            message, fds, _, _ = socket.recv_fds(self._control, 4096, 1)
        for fd in fds[1:]:
            os.close(fd)
        self._reply(message)
        if not fds:
            raise RuntimeError("cloudlet namespace sent no descriptor")
        return fds[0]

    def listen(self, port):
        """Make `port` of the helloworld address accept TCP connections from now on."""
        with self._lock:
            self._control.send(json.dumps({"listen": port}).encode())
            self._reply(self._control.recv(4096))

    def close(self):
        """End the namespace process (and so every service and TUN in it)."""
        self._control.close()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _wireguard_go_binary():
    """The wireguard-go that the wireguard4netns wheel ships.

    That build accepts a TUN device living in another network namespace
    (WG_TUN_FD) and puts its UAPI socket in its working directory, so it runs
    without root; Debian's wireguard-go looks the device up in its own
    namespace and fails. Only the binary is used (the package is not imported:
    its dependencies pin an old pyroute2), so `pip install --no-deps
    wireguard4netns` is enough.
    """
    import importlib.util

    spec = importlib.util.find_spec("wireguard4netns")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the wireguard-go cloudlet needs the wireguard4netns wheel "
            "(pip install --no-deps wireguard4netns)"
        )
    return os.path.join(spec.submodule_search_locations[0], "wireguard-go")


def wireguard_go_missing():
    """Why the wireguard-go cloudlet cannot run here ('' when it can)."""
    try:
        _wireguard_go_binary()
    except RuntimeError as e:
        return str(e)
    return ""


class _WireGuardGoResponder:
    """wireguard-go serving one client over an existing TUN fd; needs no root."""

    def __init__(
        self, tun_fd, tun_name, private_key, peer_public_key, allowed_ips, timeout=5.0
    ):
        self._tmp = tempfile.mkdtemp(prefix="sinfonia-cloudlet-")
        self._uapi_path = os.path.join(self._tmp, f"{tun_name}.sock")
        try:
            self._process = subprocess.Popen(
                [_wireguard_go_binary(), "-f", tun_name],
                env={"WG_TUN_FD": str(tun_fd), "PATH": os.environ.get("PATH", "")},
                pass_fds=[tun_fd],
                cwd=self._tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            os.close(tun_fd)
        try:
            deadline = time.monotonic() + timeout
            while not os.path.exists(self._uapi_path):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("wireguard-go did not start")
                time.sleep(0.005)
            lines = [
                f"private_key={private_key.hex()}",
                "listen_port=0",
                f"public_key={peer_public_key.hex()}",
                "replace_allowed_ips=true",
            ]
            lines += [f"allowed_ip={network}" for network in allowed_ips]
            self._uapi("set=1\n" + "".join(line + "\n" for line in lines))
            # The port is bound, and reported, only once wireguard-go has seen
            # its TUN device up, which may come after the set.
            while "listen_port" not in (fields := self._uapi("get=1\n")):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("wireguard-go bound no UDP port")
                time.sleep(0.005)
            self.listen_port = int(fields["listen_port"])
        except BaseException:
            self.stop()
            raise

    def _uapi(self, request, timeout=5.0):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self._uapi_path)
            sock.sendall(request.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        fields = dict(
            line.split("=", 1) for line in data.decode().split("\n") if "=" in line
        )
        if fields.get("errno", "0") != "0":
            raise RuntimeError(f"wireguard-go UAPI errno {fields['errno']}")
        return fields

    def stop(self):
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)


class _DatapathResponder:
    """Our own `sinfonia_tier3.Datapath` as responder; owns the TUN fd."""

    def __init__(
        self,
        datapath_class,
        tun_fd,
        private_key,
        peer_public_key,
        allowed_ips,
        host,
        port=0,
    ):
        self._tun_fd = tun_fd
        try:
            self._datapath = datapath_class(
                tun_fd,
                private_key,
                peer_public_key,
                allowed_ips=allowed_ips,
                listen=(host, port),
            )
            self._datapath.start()
        except BaseException:
            os.close(tun_fd)
            raise
        self.listen_port = self._datapath.listen_port

    def last_handshake(self):
        return self._datapath.stats()["last_handshake"]

    def stop(self):
        try:
            self._datapath.stop()
        finally:
            os.close(self._tun_fd)


class WireGuardServer:
    """The cloudlet's WireGuard side: one responder per client key.

    `implementation` is "sinfonia" (our own `Datapath` as responder, default)
    or "wireguard-go". A client key seen again gets its old tunnel back, as a
    real cloudlet gives the same deployment to the same key. The endpoint
    handed out is `name` (default: `host`) and the responder's port; `move`
    serves from another address, as a cloudlet whose name is moved there.
    """

    def __init__(
        self, implementation="sinfonia", host="127.0.0.1", max_clients=64, name=None
    ):
        if implementation == "sinfonia":
            self._datapath_class = _tool().Datapath
        elif implementation == "wireguard-go":
            _wireguard_go_binary()  # fail now, not at the first deployment
        else:
            raise ValueError(f"unknown WireGuard implementation {implementation!r}")
        self.implementation = implementation
        self.host = host
        self.name = name or host
        self.max_clients = max_clients
        self._private_key, self.public_key = generate_keypair()
        self._lock = threading.Lock()
        self._peers = {}  # client public key -> (client address, responder)
        self._next_index = 2  # 10.44.0.2 is the first client's address
        self.namespace = CloudletNamespace()

    def _responder(self, client_key, client_address, port=0):
        tun_name = f"cl{int(client_address) - int(CLIENT_NETWORK[0])}"
        tun_fd = self.namespace.open_tun(
            tun_name, client_address, packet_info=self.implementation == "wireguard-go"
        )
        allowed = [ipaddress.ip_network(f"{client_address}/32")]
        if self.implementation == "wireguard-go":
            return _WireGuardGoResponder(
                tun_fd, tun_name, self._private_key, client_key, allowed
            )
        return _DatapathResponder(
            self._datapath_class,
            tun_fd,
            self._private_key,
            client_key,
            allowed,
            self.host,
            port,
        )

    def tunnel_config_for(self, uuid, client_key):
        """The deploy answer's `TunnelConfig` for `client_key` (32 raw bytes).

        Every backend `uuid` is served from the same namespace.
        """
        if len(client_key) != 32:
            raise ValueError("a WireGuard public key is 32 bytes")
        with self._lock:
            if client_key not in self._peers:
                if len(self._peers) >= self.max_clients:
                    raise RuntimeError(
                        f"the cloudlet serves at most {self.max_clients} clients"
                    )
                index, self._next_index = self._next_index, self._next_index + 1
                address = CLIENT_NETWORK[index]
                responder = self._responder(client_key, address)
                self._peers[client_key] = (address, responder)
            address, responder = self._peers[client_key]
        host = f"[{self.name}]" if ":" in self.name else self.name
        return {
            "publicKey": base64.b64encode(self.public_key).decode(),
            "allowedIPs": [str(CLOUDLET_NETWORK)],
            "endpoint": f"{host}:{responder.listen_port}",
            "address": [f"{address}/32"],
            "dns": [str(DNS_ADDRESS), *SEARCH_DOMAINS],
        }

    def release(self, client_key):
        """Stop serving `client_key`; its TUN device goes away with the responder."""
        with self._lock:
            peer = self._peers.pop(client_key, None)
        if peer is not None:
            peer[1].stop()

    def last_handshakes(self):
        """The time (epoch seconds) of each client's last completed handshake,
        in the order the clients came; our own responders only."""
        with self._lock:
            responders = [responder for _, responder in self._peers.values()]
        return [responder.last_handshake() for responder in responders]

    def restart(self):
        """Forget every client, and take a new key: a restarted cloudlet."""
        self._stop_responders()
        with self._lock:
            self._private_key, self.public_key = generate_keypair()
            self._next_index = 2

    def move(self, host):
        """Serve every client from `host` (same ports) and no longer from the
        old address; the endpoints handed out keep their name."""
        if self.implementation != "sinfonia":
            raise ValueError("wireguard-go listens on every address: it cannot move")
        with self._lock:
            self.host = host
            for key, (address, responder) in list(self._peers.items()):
                port = responder.listen_port
                responder.stop()
                self._peers[key] = (address, self._responder(key, address, port))

    def _stop_responders(self):
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        # Newest first: a responder's worker processes hold copies of the
        # descriptors of the responders started before it.
        for _, responder in reversed(peers):
            responder.stop()

    def close(self):
        """Stop every responder and the cloudlet's namespace."""
        self._stop_responders()
        self.namespace.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Candidates:
    """A Tier 1 stand-in offering several deployments of a backend, each
    from a cloudlet of its own, in the order of `delays`: {DeploymentName:
    None for a cloudlet whose endpoint nobody serves, else the seconds a
    DelayingRelay in front of a real WireGuardServer holds each datagram each
    way (0: no relay)}. `url` is its deploy URL; use it as a context manager."""

    def __init__(self, delays):
        self.delays = dict(delays)
        self._servers = {name: WireGuardServer() if delay is not None else StaticWireGuard()
                         for name, delay in self.delays.items()}
        self._relays = {}  # name -> DelayingRelay, made at the first deployment
        self._api = Cloudlet()
        self._api.rewrite = self._offer
        self.url = self._api.url

    def _offer(self, deployments):
        offer = deployments[0]
        uuid, key = offer["UUID"], base64.b64decode(offer["ApplicationKey"])
        offered = []
        for name, server in self._servers.items():
            config = server.tunnel_config_for(uuid, key)
            if self.delays[name]:
                if name not in self._relays:
                    host, port = config["endpoint"].rsplit(":", 1)
                    self._relays[name] = DelayingRelay((host, int(port)), self.delays[name])
                config = dict(config, endpoint=self._relays[name].endpoint)
            offered.append(dict(offer, TunnelConfig=config, DeploymentName=name))
        return offered

    def endpoint(self, name, client_key):
        """The endpoint candidate `name` gives `client_key` (32 bytes)."""
        if name in self._relays:
            return self._relays[name].endpoint
        return self._servers[name].tunnel_config_for(HELLOWORLD, client_key)["endpoint"]

    def __enter__(self):
        self._api.start()
        return self

    def __exit__(self, *exc):
        self._api.stop()
        for relay in self._relays.values():
            relay.close()
        for server in self._servers.values():
            if isinstance(server, WireGuardServer):
                server.close()


# As upstream's ZeroconfMDNS.announce (sinfonia/app_tier2.py), whose address
# is that of the default route's interface; run by `announce_tier2`.
_ANNOUNCER = """
import sys
from zeroconf import ServiceInfo, Zeroconf
address, port = sys.argv[1], int(sys.argv[2])
info = ServiceInfo("_sinfonia._tcp.local.", "cloudlet._sinfonia._tcp.local.",
                   parsed_addresses=[address], port=port, properties=dict(path="/"))
zeroconf = Zeroconf()
zeroconf.register_service(info, allow_name_change=True)
print("registered", flush=True)
sys.stdin.read()
zeroconf.unregister_all_services()
zeroconf.close()
"""


@contextlib.contextmanager
def announce_tier2(namespace, address, port):
    """python-zeroconf announcing a Tier 2 at `address`:`port` inside
    `namespace` (a netns.Namespace) exactly as upstream's Tier 2 registers
    itself, from the moment its registration is done until the block ends."""
    announcer = namespace.popen([sys.executable, "-c", _ANNOUNCER, address, str(port)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if announcer.stdout.readline() != "registered\n":
            raise RuntimeError("python-zeroconf did not register the Tier 2")
        yield
    finally:
        announcer.stdin.close()
        try:
            announcer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            announcer.kill()
            announcer.wait()


def run_demo(implementation="sinfonia", timeout=120):
    """Start a cloudlet, run sinfonia-tier3 with curl against it, stop.

    The page curl got goes to stdout, the tool's progress to stderr; returns
    the tool's exit status. The client key lives in a temporary cache, so the
    demo leaves nothing behind.
    """
    try:
        wireguard = WireGuardServer(implementation)
    except (ImportError, OSError, RuntimeError) as e:
        print(f"demo: cannot start the cloudlet: {e}", file=sys.stderr)
        return 1
    with wireguard, Cloudlet(wireguard=wireguard) as api:
        command = ["curl", "-sS", "http://helloworld/"]
        print(
            f"$ sinfonia-tier3 {api.url} helloworld -- {' '.join(command)}",
            file=sys.stderr,
            flush=True,
        )
        with tempfile.TemporaryDirectory() as cache:
            tool = os.path.join(REPO, "sinfonia_tier3.py")
            try:
                return subprocess.run(
                    [sys.executable, tool, api.url, "helloworld", "--", *command],
                    env=dict(os.environ, XDG_CACHE_HOME=cache),
                    timeout=timeout,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                print(f"demo: no answer within {timeout} s", file=sys.stderr)
                return 124


def _serve(argv=None):
    parser = argparse.ArgumentParser(
        prog="cloudlet.py", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="serve the deploy API until interrupted")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--misbehave", choices=sorted(MISBEHAVIOURS))
    serve.add_argument(
        "--wireguard",
        choices=("none", "sinfonia", "wireguard-go"),
        default="none",
        help="serve real tunnels to the helloworld backend with this WireGuard "
        "server (default: none, the deploy API only)",
    )
    demo = sub.add_parser(
        "demo",
        help="run `sinfonia-tier3 ... curl http://helloworld/` against a cloudlet",
    )
    demo.add_argument(
        "--wireguard",
        choices=("sinfonia", "wireguard-go"),
        default="sinfonia",
        help="the cloudlet's WireGuard server (default: our own responder)",
    )
    options = parser.parse_args(argv)
    if options.action == "demo":
        return run_demo(options.wireguard)
    if options.wireguard != "none":
        with WireGuardServer(options.wireguard) as wireguard:
            return _serve_until_interrupted(options, wireguard)
    return _serve_until_interrupted(options, None)


def _serve_until_interrupted(options, wireguard):
    cloudlet = Cloudlet(wireguard=wireguard, host=options.host, port=options.port)
    cloudlet.misbehaviour = options.misbehave
    with cloudlet:
        print(
            f"test cloudlet at {cloudlet.url} (helloworld = {HELLOWORLD})", flush=True
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
