"""Forwards: -L, -D (SOCKS5) and -R.

The parsers first (specs from the command line, and every byte a SOCKS5
client may send, fuzzed), then the relay on loopback sockets, then end to end
against the test cloudlet (tests/cloudlet.py), as root and as the test user:
curl through -L and through -D with names resolved in the namespace, the
SOCKS5 error codes, UDP ASSOCIATE to the cloudlet's DNS, -R with a connection
made from the cloudlet's namespace, 100 connections at once, 200 MiB each way
and half-close, and what SIGTERM leaves (nothing).
"""

import hashlib
import ipaddress
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading

import cloudlet
import pytest
import sessions
from checkout import REPO
from hypothesis import given, settings
from hypothesis import strategies as s
from netns import require_programs

import sinfonia_tier3 as st3

pytestmark = pytest.mark.forward


# Specs ########################################################################


@pytest.mark.parametrize("option, text, fields", [
    ("-L", "8080:helloworld:80", (None, 8080, "helloworld", 80)),
    ("-L", "0.0.0.0:8080:10.43.0.20:80", ("0.0.0.0", 8080, "10.43.0.20", 80)),
    ("-L", "[::1]:8080:[fd00::1]:22", ("::1", 8080, "fd00::1", 22)),
    ("-L", "localhost:0:a-b.c_d.svc:65535", ("127.0.0.1", 0, "a-b.c_d.svc", 65535)),
    ("-R", "9000:127.0.0.1:80", (None, 9000, "127.0.0.1", 80)),
    ("-D", "1080", (None, 1080, None, None)),
    ("-D", "[::]:1080", ("::", 1080, None, None)),
])
def test_specs_in_ssh_syntax(option, text, fields):
    spec = st3._parse_forward(option, text)
    assert (spec.bind_host, spec.bind_port, spec.host, spec.port) == fields


@pytest.mark.parametrize("option, text, why", [
    ("-L", "8080:helloworld", "2 parts"),
    ("-L", "1:2:3:4:5", "5 parts"),
    ("-D", "1:2:3", "3 parts"),
    ("-L", "8080:helloworld:0", "'0' is not a port number"),
    ("-L", "65536:helloworld:80", "'65536' is not a port number"),
    ("-L", "٨٠:helloworld:80", "is not a port number"),
    ("-L", "example.org:80:helloworld:80", "is not an IP address to listen on"),
    ("-L", "::1:80:helloworld:80", "parts"),
    ("-L", "[::1:80:h:80", "brackets only go around a whole IPv6 address"),
    ("-L", "80:[helloworld]:80", "is not a host name or IP address"),
    ("-L", "80:hello world:80", "is not a host name or IP address"),
    ("-L", "80:-x:80", "is not a host name or IP address"),
    ("-L", "80:\x1b[31m:80", "brackets only go around"),
    ("-R", "80::80", "'' is not a host name"),
])
def test_bad_specs_say_why(option, text, why):
    with pytest.raises(st3.UsageError) as raised:
        st3._parse_forward(option, text)
    assert why in str(raised.value)
    assert st3._FORWARD_SYNTAX[option] in str(raised.value)


def test_a_bad_spec_is_a_usage_error_before_anything_is_deployed(capsys):
    # No server listens at this URL: a spec checked after deploying would
    # fail there instead, with 125.
    with pytest.raises(SystemExit) as raised:
        st3.main(["-L", "80:helloworld", "http://127.0.0.1:9/", "helloworld"])
    assert raised.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.endswith("argument -L: '80:helloworld': 2 parts "
                          "(expected [BIND_ADDRESS:]PORT:HOST:HOSTPORT)"), error


def test_forwards_do_not_go_with_json(capsys):
    assert st3.main(["--json", "-D", "1080", "http://127.0.0.1:9/", "helloworld"]) == 2
    assert "-L, -D and -R need a session" in capsys.readouterr().err


def test_a_port_in_use_is_one_line_before_deploying(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = st3.main(["-L", f"{port}:helloworld:80", "http://127.0.0.1:9/",
                           "helloworld", "true"])
    assert status == 125
    assert capsys.readouterr().err == (
        f"sinfonia-tier3: -L {port}:helloworld:80: cannot listen on 127.0.0.1:{port}: "
        "Address already in use\n")
    # Nor is the session's socket left behind for a later invocation to find.
    cache = st3._key_cache_dir()
    assert not [name for name in os.listdir(cache) if name.startswith("session-")
                and not name.endswith(".lock")]


# SOCKS5 parsing: every byte hostile ############################################


def _request(command, kind, address, port):
    if kind == st3._SOCKS_DOMAIN:
        address = bytes([len(address)]) + address
    return bytes([5, command, 0, kind]) + address + struct.pack(">H", port)


@given(s.binary(max_size=300))
@settings(max_examples=2000, deadline=None)
def test_any_bytes_are_a_message_incomplete_or_refused(data):
    for parse in (st3._socks_greeting, st3._socks_request):
        try:
            result = parse(data)
        except st3._SocksError as e:
            assert e.code is None or 0 < e.code < 256
            continue
        assert result is None or result[-1] <= len(data)
    try:
        host, port, payload = st3._socks_udp_datagram(data)
    except st3._SocksError:
        return
    assert 0 <= port < 65536 and len(payload) < len(data)
    assert st3._is_host_name(host) or ipaddress.ip_address(host)


@given(s.sampled_from([st3._SOCKS_CONNECT, st3._SOCKS_UDP_ASSOCIATE]),
       s.one_of(
           s.ip_addresses(v=4).map(lambda a: (st3._SOCKS_IPV4, a.packed, str(a))),
           s.ip_addresses(v=6).map(lambda a: (st3._SOCKS_IPV6, a.packed, str(a))),
           s.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?\Z").map(
               lambda n: (st3._SOCKS_DOMAIN, n.encode(), n))),
       s.integers(0, 65535), s.binary(max_size=20))
def test_requests_are_read_whole_and_only_whole(command, address, port, rest):
    kind, raw, text = address
    request = _request(command, kind, raw, port)
    for cut in range(len(request)):
        assert st3._socks_request(request[:cut]) is None
    assert st3._socks_request(request + rest) == (command, text, port, len(request))
    datagram = b"\0\0\0" + request[3:] + rest
    assert st3._socks_udp_datagram(datagram) == (text, port, rest)


@pytest.mark.parametrize("request_bytes, code", [
    (bytes([4, 1, 0, 1, 1, 2, 3, 4, 0, 80]), None),  # SOCKS4
    (bytes([5, 1, 1, 1, 1, 2, 3, 4, 0, 80]), None),  # reserved byte set
    (bytes([5, 2, 0, 1, 1, 2, 3, 4, 0, 80]), st3._SOCKS_COMMAND_NOT_SUPPORTED),  # BIND
    (bytes([5, 1, 0, 9, 1, 2, 3, 4, 0, 80]), st3._SOCKS_ADDRESS_TYPE_NOT_SUPPORTED),
    (_request(1, st3._SOCKS_DOMAIN, b"evil\x1b[2J", 80), st3._SOCKS_HOST_UNREACHABLE),
    (_request(1, st3._SOCKS_DOMAIN, "bücher.de".encode(), 80),
     st3._SOCKS_HOST_UNREACHABLE),
])
def test_requests_refused_with_their_code(request_bytes, code):
    with pytest.raises(st3._SocksError) as raised:
        st3._socks_request(request_bytes)
    assert raised.value.code == code


def test_greetings():
    assert st3._socks_greeting(b"\x05") is None
    assert st3._socks_greeting(b"\x05\x02\x02") is None
    assert st3._socks_greeting(b"\x05\x02\x02\x00rest") == (True, 4)
    assert st3._socks_greeting(b"\x05\x01\x02") == (False, 3)
    with pytest.raises(st3._SocksError):
        st3._socks_greeting(b"\x04\x01\x00")


# The relay on loopback ######################################################


@pytest.fixture
def relay():
    """A `_Relay` running in a thread; stopped and joined afterwards."""
    relay = st3._Relay()
    stop, stop_end = socket.socketpair()
    thread = threading.Thread(target=relay.run, args=(stop_end,), daemon=True)
    yield relay, thread.start
    stop.close()
    thread.join(timeout=5)
    stop_end.close()
    assert not thread.is_alive()


def _listener(host="127.0.0.1"):
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen()
    return sock


def test_half_close_goes_both_ways_and_data_after_it(relay):
    relay, start = relay
    with _listener() as target, _listener() as front:
        relay.add_port_forward(front, "127.0.0.1", target.getsockname()[1], print)
        start()
        with socket.create_connection(front.getsockname(), timeout=10) as client:
            server, _ = target.accept()
            with server:
                server.settimeout(10)
                client.sendall(b"question")
                client.shutdown(socket.SHUT_WR)
                assert _read_all(server) == b"question"  # EOF came through
                server.sendall(b"answer after the client's end")
                server.shutdown(socket.SHUT_WR)
                assert _read_all(client) == b"answer after the client's end"


def _read_all(sock):
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_a_refused_target_closes_the_client_and_is_told(relay):
    relay, start = relay
    told = []
    with _listener() as unused:
        port = unused.getsockname()[1]
    with _listener() as front:
        relay.add_port_forward(front, "127.0.0.1", port, told.append)
        start()
        with socket.create_connection(front.getsockname(), timeout=10) as client:
            assert client.recv(1) == b""
    assert told == [f"cannot connect to 127.0.0.1:{port}: Connection refused"]


def test_socks5_connect_on_loopback_with_ipv4_and_ipv6(relay):
    relay, start = relay
    with _listener() as front, _listener() as v4, _listener("::1") as v6, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        relay.add_socks(front, udp)
        start()
        for target, kind in ((v4, st3._SOCKS_IPV4), (v6, st3._SOCKS_IPV6)):
            host, port = target.getsockname()[:2]
            with socket.create_connection(front.getsockname(), timeout=10) as client:
                # Greeting, request and data in one write: a client may send them so.
                client.sendall(b"\x05\x01\x00" + _request(
                    1, kind, ipaddress.ip_address(host).packed, port) + b"early")
                assert client.recv(2) == b"\x05\x00"
                reply = client.recv(4)
                assert reply[:3] == b"\x05\x00\x00"
                client.recv(4 if reply[3] == st3._SOCKS_IPV4 else 16)
                client.recv(2)
                server, _ = target.accept()
                with server:
                    assert server.recv(5) == b"early"


@pytest.fixture(scope="module")
def socks_on_loopback():
    """A relay in a thread serving SOCKS5 on loopback, and a target there
    that answers b"up" to every connection (module-wide: hypothesis reuses it)."""
    relay = st3._Relay()
    stop, stop_end = socket.socketpair()
    with _listener() as front, _listener() as target, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        relay.add_socks(front, udp)
        thread = threading.Thread(target=relay.run, args=(stop_end,), daemon=True)
        thread.start()

        def answer():
            while True:
                try:
                    connection, _ = target.accept()
                except OSError:
                    return
                with connection:
                    connection.sendall(b"up")

        threading.Thread(target=answer, daemon=True).start()
        yield front.getsockname(), target.getsockname()[1]
        stop.close()
        thread.join(timeout=5)
    stop_end.close()


@given(s.binary(min_size=1, max_size=600))
@settings(max_examples=150, deadline=None)
def test_whatever_a_client_sends_the_proxy_still_serves_the_next(socks_on_loopback, junk):
    proxy, port = socks_on_loopback
    with socket.create_connection(proxy, timeout=10) as hostile:
        try:
            hostile.sendall(junk)
            hostile.shutdown(socket.SHUT_WR)
            hostile.recv(4096)
        except OSError:  # reset: the proxy gave up on it, as it may
            pass
    with socket.create_connection(proxy, timeout=10) as client:
        client.sendall(b"\x05\x01\x00" + _request(1, st3._SOCKS_IPV4, bytes([127, 0, 0, 1]),
                                                   port))
        assert _read_all(client)[-2:] == b"up"


# End to end ##################################################################

TOOL = str(REPO / "sinfonia_tier3.py")
GREETING = "Hello from the sinfonia test cloudlet!\n"

e2e = pytest.mark.skipif(bool(sessions.missing_root()), reason=sessions.missing_root())


@pytest.fixture(scope="module")
def server():
    """A cloudlet with a real WireGuard side (ours) for the whole module."""
    with cloudlet.WireGuardServer("sinfonia") as wireguard, \
            cloudlet.Cloudlet(wireguard=wireguard) as api:
        yield api, wireguard


@pytest.fixture(params=["root", "user"])
def tool(request):
    """sessions.Runner as root or as the test user."""
    with sessions.tun_open_to_all(), sessions.user_directory() as scratch:
        yield sessions.Runner([TOOL], request.param == "user", scratch)


def _said(process):
    """What the tool has said on stderr so far (for failure messages)."""
    said = b""
    while select.select([process.stderr], [], [], 0.5)[0]:
        chunk = os.read(process.stderr.fileno(), 4096)
        if not chunk:
            break
        said += chunk
    return said.decode(errors="replace")


def _host_port(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


@pytest.fixture
def root_tool(tmp_path):
    """sessions.Runner as root, for what runs the same for every user."""
    return sessions.Runner([TOOL], False, str(tmp_path))


def _stop(process, signum):
    """Send `signum` to the tool and wait (bounded) for its end, killing it
    after 30 s; the rest of its stderr."""
    try:
        process.send_signal(signum)
        return process.communicate(timeout=30)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _namespace(pid, kind):
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def _curl(*args):
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def _dns_query(name):
    """A DNS query for the A record of `name` (id 0x5151)."""
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    return struct.pack(">HHHHHH", 0x5151, 0x0100, 1, 0, 0, 0) + question + b"\0\0\1\0\1"


def _socks_udp_exchange(proxy, payload, target):
    """Send `payload` to `target` through a SOCKS5 UDP ASSOCIATE at `proxy`;
    the payload of the answer."""
    with socket.create_connection(proxy, timeout=10) as control, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(10)
        control.sendall(b"\x05\x01\x00")
        assert control.recv(2) == b"\x05\x00"
        control.sendall(_request(3, st3._SOCKS_IPV4, b"\0\0\0\0", udp.getsockname()[1]))
        reply = control.recv(10)
        assert reply[:4] == b"\x05\x00\x00\x01", reply
        relay_address = (str(ipaddress.ip_address(reply[4:8])),
                         struct.unpack(">H", reply[8:10])[0])
        header = b"\0\0\0\1" + ipaddress.ip_address(target[0]).packed + \
            struct.pack(">H", target[1])
        udp.sendto(header + payload, relay_address)
        answer, _ = udp.recvfrom(65535)
        assert answer[:len(header)] == header  # from the target, as SOCKS5 says
        return answer[len(header):]


@e2e
@pytest.mark.e2e
def test_curl_through_L_D_and_R_then_sigterm_leaves_nothing(server, tool):
    require_programs("curl")
    api, wireguard = server
    with _listener() as outside:  # what -R reaches, in the caller's namespace
        back = outside.getsockname()[1]
        process = tool.start("-L", "0:helloworld:80", "-D", "0", "-R",
                             f"0:127.0.0.1:{back}", api.url, "helloworld")
        try:
            (local, proxy, remote), said = sessions.forwarding_addresses(process, 3)
            assert re.search(r"forwarding 127\.0\.0\.1:\d+ -> helloworld:80\n", said), said
            assert re.search(r"forwarding 10\.44\.\d+\.\d+:\d+ in the namespace -> "
                             rf"127\.0\.0\.1:{back}\n", said), said
            result = _curl(f"http://{local}/")
            assert result.stdout.startswith(GREETING), result.stderr
            result = _curl("--socks5-hostname", proxy, "http://helloworld/")
            assert result.stdout.startswith(GREETING), result.stderr
            for target, code in (("helloworld:81", 5), ("nosuch.invalid", 4),
                                 ("192.0.2.1", 3)):  # no route to it in the namespace
                result = _curl("--socks5-hostname", proxy, f"http://{target}/")
                assert result.returncode == 97, result.stderr
                assert f"({code})" in result.stderr, result.stderr
            answer = _socks_udp_exchange(_host_port(proxy), _dns_query("helloworld"),
                                         (str(cloudlet.DNS_ADDRESS), 53))
            assert answer[:2] == b"\x51\x51"
            assert cloudlet.HELLOWORLD_ADDRESS.packed in answer
            # The backend calls the client: from the cloudlet's namespace to
            # the tunnel address, and on to the listener here.
            with wireguard.namespace.tcp_socket() as backend:
                backend.settimeout(10)
                backend.connect(_host_port(remote))
                accepted, _ = outside.accept()
                with accepted:
                    backend.sendall(b"call back")
                    assert accepted.recv(9) == b"call back"
                    accepted.sendall(b"answered")
                    assert backend.recv(8) == b"answered"
            pids = sessions.descendants(process.pid)
            holder = next(p for p in pids if _namespace(p, "pid") == _namespace(
                process.pid, "pid") and _namespace(p, "net") != _namespace(process.pid, "net"))
            namespaces = sessions.namespaces_of(holder)
        finally:
            rest = _stop(process, signal.SIGTERM)
    assert process.returncode == 0, rest
    assert rest.splitlines()[-1] == "sinfonia-tier3: SIGTERM: closing the forwards", rest
    sessions.assert_nothing_left(pids, namespaces)
    for address in (local, proxy):  # nothing listens there any more
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
            probe.bind(_host_port(address))
            probe.listen()
    if tool.as_user:
        assert sessions.files_of_user(tool.uid) == []


@e2e
@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_stop_the_forwards_too(server, root_tool, signum):
    process = root_tool.start("-D", "0", server[0].url, "helloworld")
    try:
        (proxy,), _ = sessions.forwarding_addresses(process, 1)
    finally:
        rest = _stop(process, signum)
    assert process.returncode == 0, rest
    assert rest == f"sinfonia-tier3: {signal.Signals(signum).name}: closing the forwards\n"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(_host_port(proxy), timeout=10).close()


ECHO_SERVER = r'''
import socket, socketserver
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(1 << 18)
            if not data:
                break
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = daemon_threads = True
    request_queue_size = 128  # the 100 connections come at once
server = Server(("127.0.0.1", 7777), Echo)
print("ready", flush=True)
server.serve_forever()
'''
BULK = 200 << 20


def _deterministic_chunks(total, size=1 << 20):
    """`total` bytes in chunks, the same for every run (a counter's hashes)."""
    block = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size // 32))
    for offset in range(0, total, size):
        yield block[:min(size, total - offset)]


def _echo_through(address, chunks):
    """Send `chunks` to the echo server at `address`, half-close, and read
    until its end; (sha256 sent, sha256 received, bytes received)."""
    sent, received, count = hashlib.sha256(), hashlib.sha256(), 0
    with socket.create_connection(address, timeout=30) as sock:
        def send():
            for chunk in chunks:
                sent.update(chunk)
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while True:
            data = sock.recv(1 << 18)
            if not data:
                break
            received.update(data)
            count += len(data)
        sender.join(timeout=30)
    return sent.hexdigest(), received.hexdigest(), count


@e2e
@pytest.mark.e2e
def test_100_connections_at_once_and_200_mib_each_way(server, root_tool):
    api, _ = server
    process = root_tool.start("-L", "0:127.0.0.1:7777", api.url, "helloworld",
                              "--", sys.executable, "-c", ECHO_SERVER)
    try:
        (local,), said = sessions.forwarding_addresses(process, 1)
        assert process.stdout.readline() == "ready\n", said
        address = _host_port(local)
        clients = [socket.create_connection(address, timeout=30) for _ in range(100)]
        try:
            for i, client in enumerate(clients):  # all open before any answer
                client.sendall(b"connection %d" % i)
                client.shutdown(socket.SHUT_WR)
            answers = [_read_all(client) for client in clients]
        finally:
            for client in clients:
                client.close()
        assert answers == [b"connection %d" % i for i in range(100)], _said(process)
        sent, received, count = _echo_through(address, _deterministic_chunks(BULK))
        assert (received, count) == (sent, BULK)
    finally:
        _stop(process, signal.SIGTERM)  # to the echo server, with a COMMAND
    assert process.returncode == 128 + signal.SIGTERM


@e2e
@pytest.mark.e2e
def test_a_name_that_does_not_resolve_inside_is_one_line(server, root_tool):
    status, _, stderr = root_tool.run("-L", "0:nosuch.invalid:80", server[0].url,
                                      "helloworld", "true")
    assert status == 125
    assert stderr.splitlines()[-1] == (
        "sinfonia-tier3: -L 0:nosuch.invalid:80: nosuch.invalid does not resolve in "
        "the application's namespace: Name or service not known"), stderr
