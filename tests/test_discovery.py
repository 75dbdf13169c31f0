"""Finding and choosing the cloudlet: Tier 2s found by mDNS (python-zeroconf
announcing as the upstream Tier 2 does, inside a namespace made here),
hostile mDNS answers, candidates ranked by a real WireGuard handshake (a
dead, a slow and a fast cloudlet), location hints reaching the server, and
an application held until its backend answers (--wait-for)."""

import contextlib
import ipaddress
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading

import pytest
import sessions
from checkout import REPO
from cloudlet import (
    HELLOWORLD,
    Candidates,
    Cloudlet,
    StaticWireGuard,
    WireGuardServer,
    announce_tier2,
)
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as s
from netns import Namespace, inside, require_programs, veth_pair

import sinfonia_tier3 as st3

pytestmark = pytest.mark.discovery

TOOL = str(REPO / "sinfonia_tier3.py")
SERVICE = "_sinfonia._tcp.local."
TIER2_ADDRESS = "192.168.77.2"  # the announcing end of the veth pair
CLIENT_ADDRESS = "192.168.77.1"


def zeroconf_response(ident, address=TIER2_ADDRESS, port=5000, path="/"):
    """The answer python-zeroconf itself builds for the upstream Tier 2's
    registration: PTR, then SRV, TXT and A as additionals, compressed."""
    from zeroconf import DNSOutgoing, ServiceInfo, const

    info = ServiceInfo(SERVICE, f"cloudlet.{SERVICE}", parsed_addresses=[address],
                       port=port, properties={"path": path})
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA, multicast=False, id_=ident)
    out.add_answer_at_time(info.dns_pointer(), 0)
    out.add_additional_answer(info.dns_service())
    out.add_additional_answer(info.dns_text())
    for record in info.dns_addresses():
        out.add_additional_answer(record)
    (packet,) = out.packets()
    return packet


def answers_in(*packets):
    answers = st3._Tier2Answers()
    for packet in packets:
        parsed = st3._parse_mdns(packet)
        if parsed is not None:
            answers.add(parsed[1])
    return answers


# The mDNS parser ------------------------------------------------------------


def test_python_zeroconfs_answer_gives_the_tier2s_deploy_url():
    ident, records = st3._parse_mdns(zeroconf_response(4242))
    assert ident == 4242
    assert {record.type for record in records} == {st3._DNS_PTR, st3._DNS_SRV, st3._DNS_TXT,
                                                   st3._DNS_A}
    assert answers_in(zeroconf_response(1)).urls() == [f"http://{TIER2_ADDRESS}:5000/"]
    url = answers_in(zeroconf_response(1, path="/sinfonia/")).urls()[0]
    assert st3._deploy_url(url, HELLOWORLD, bytes(32), 1).startswith(
        f"http://{TIER2_ADDRESS}:5000/sinfonia/api/v1/deploy/{HELLOWORLD}/")


def test_what_the_first_answer_left_out_is_asked_again():
    packet = zeroconf_response(1)
    ptr_only = packet[:2] + b"\x84\x00\x00\x00\x00\x01\x00\x00\x00\x00" + packet[12:]
    answers = answers_in(ptr_only)  # the same answer, counting only the PTR
    assert answers.instances == [(b"cloudlet", *st3._SINFONIA_SERVICE)]
    assert answers.urls() == []
    asked = {(name, kind) for name, kind in answers.questions()}
    assert asked == {(st3._SINFONIA_SERVICE, st3._DNS_PTR),
                     (answers.instances[0], st3._DNS_SRV), (answers.instances[0], st3._DNS_TXT)}


def test_several_tier2s_each_give_a_url_and_each_deploys():
    from zeroconf import DNSOutgoing, ServiceInfo, const

    second = ServiceInfo(SERVICE, f"cloudlet (2).{SERVICE}", parsed_addresses=["10.9.9.9"],
                         port=5001, properties={"path": "/"})
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA, multicast=False, id_=1)
    for record in (second.dns_pointer(), second.dns_service(), second.dns_text(),
                   *second.dns_addresses()):
        out.add_answer_at_time(record, 0)
    urls = answers_in(zeroconf_response(1), *out.packets()).urls()
    assert urls == [f"http://{TIER2_ADDRESS}:5000/", "http://10.9.9.9:5001/"]
    with Cloudlet() as first, Cloudlet() as other:
        keypair = st3._load_or_create_keypair(HELLOWORLD)
        offered, failures = st3._deploy_on_tier2s(
            [first.url, other.url, "http://127.0.0.1:9"], HELLOWORLD, keypair, results=1,
            timeout=5, debug=False, hints={})
    assert [(d.tunnel_config.endpoint, url) for d, url in offered] == [
        (st3._Endpoint(*st3._host_port(first.wireguard.endpoint)), first.url),
        (st3._Endpoint(*st3._host_port(other.wireguard.endpoint)), other.url)]
    assert failures == ["http://127.0.0.1:9: cannot reach 127.0.0.1:9: Connection refused"]


def test_a_flood_of_answers_keeps_a_bounded_number_of_names():
    answers = st3._Tier2Answers()
    for number in range(10_000):
        other = (b"x%d" % number, b"local")
        answers.add([st3._MdnsRecord(other, st3._DNS_SRV, (1, other)),
                     st3._MdnsRecord(other, st3._DNS_TXT, (b"path=/",)),
                     st3._MdnsRecord(other, st3._DNS_A, ipaddress.ip_address("10.0.0.1")),
                     st3._MdnsRecord(st3._SINFONIA_SERVICE, st3._DNS_PTR,
                                     (b"c%d" % number, *st3._SINFONIA_SERVICE))])
    assert [len(kept) for kept in (answers.instances, answers.services, answers.texts,
                                   answers.addresses)] == [st3._MAX_TIER2S] + \
        [st3._MAX_MDNS_NAMES] * 3


def header(answers, flags=0x8400, ident=7):
    return struct.pack("!6H", ident, flags, 0, answers, 0, 0)


def name(*labels):
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"


def record(owner, kind, data, ttl=120):
    return owner + struct.pack("!HHIH", kind, 1, ttl, len(data)) + data


SERVICE_NAME = name(b"_sinfonia", b"_tcp", b"local")
HOSTILE = {
    "empty": b"",
    "short header": b"\x00\x07\x84",
    "pointer to itself": header(1) + b"\xc0\x0c" + struct.pack("!HHIH", 12, 1, 120, 2) + b"\xc0\x0c",
    "pointer loop in the data": header(1) + record(SERVICE_NAME, 12, b"\xc0\x2c"),
    "pointer forward": header(1) + b"\xc0\x20" + bytes(30),
    "pointer cut short": header(1) + b"\xc0",
    "reserved label type": header(1) + b"\x80abc\x00" + bytes(10),
    "label runs off the end": header(1) + b"\x3fabc",
    "name longer than 255": header(1) + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63
    + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63 + b"\x00" + bytes(10),
    "huge answer count": header(65535) + record(SERVICE_NAME, 12, b"\x01x\xc0\x0c"),
    "huge question count": struct.pack("!6H", 7, 0x8400, 65535, 0, 0, 0) + SERVICE_NAME + b"\0\x0c\0\x01",
    "record runs off the end": header(1) + SERVICE_NAME + struct.pack("!HHIH", 12, 1, 120, 500) + b"x",
    "A record of 6 bytes": header(1) + record(name(b"host", b"local"), 1, b"\x0a" * 6),
    "AAAA record of 4 bytes": header(1) + record(name(b"host", b"local"), 28, b"\x0a" * 4),
    "SRV record of 3 bytes": header(1) + record(name(b"x", b"local"), 33, b"abc"),
    "SERVICE_NAME data longer than its name": header(1) + record(SERVICE_NAME, 12, name(b"a") + b"junk"),
    "TXT string past its record": header(1) + record(SERVICE_NAME, 16, b"\x09path=/"),
}


@pytest.mark.parametrize("packet", HOSTILE.values(), ids=HOSTILE.keys())
def test_malformed_answers_are_dropped_whole(packet):
    assert st3._parse_mdns(packet) is None


def test_goodbyes_other_classes_and_queries_give_no_records():
    instance = name(b"cloudlet", b"_sinfonia", b"_tcp", b"local")
    assert st3._parse_mdns(header(1) + record(SERVICE_NAME, 12, instance, ttl=0)) == (7, [])
    chaos = SERVICE_NAME + struct.pack("!HHIH", 12, 3, 120, len(instance)) + instance
    assert st3._parse_mdns(header(1) + chaos) == (7, [])
    assert st3._parse_mdns(header(1, flags=0)) == (7, ())


def test_odd_answers_give_no_url():
    instance, host = (b"cloudlet", *st3._SINFONIA_SERVICE), (b"host", b"local")
    pointer = st3._MdnsRecord(st3._SINFONIA_SERVICE, st3._DNS_PTR, instance)
    service = st3._MdnsRecord(instance, st3._DNS_SRV, (5000, host))
    address = st3._MdnsRecord(host, st3._DNS_A, ipaddress.ip_address("10.1.1.1"))

    def urls(*records):
        answers = st3._Tier2Answers()
        answers.add(records)
        return answers.urls()

    assert urls(pointer, service, address) == ["http://10.1.1.1:5000/"]
    assert urls(pointer, service, address,
                st3._MdnsRecord(instance, st3._DNS_TXT, (b"path=/a b\r\n",))) == []
    assert urls(pointer, st3._MdnsRecord(instance, st3._DNS_SRV, (0, host)), address) == []
    assert urls(pointer, service,
                st3._MdnsRecord(host, st3._DNS_AAAA, ipaddress.ip_address("fe80::1"))) == []
    other = (b"x", b"_other", b"_tcp", b"local")
    assert urls(st3._MdnsRecord(st3._SINFONIA_SERVICE, st3._DNS_PTR, other),
                st3._MdnsRecord(other, st3._DNS_SRV, (5000, host)), address) == []
    assert urls(pointer, service,
                st3._MdnsRecord(host, st3._DNS_AAAA, ipaddress.ip_address("fd00::5"))) == [
        "http://[fd00::5]:5000/"]


@settings(max_examples=400, deadline=None)
@given(s.binary(max_size=600))
def test_any_bytes_parse_or_are_dropped(packet):
    parsed = st3._parse_mdns(packet)
    if parsed is not None:
        st3._Tier2Answers().add(parsed[1])


@settings(max_examples=400, deadline=None)
@given(s.data())
def test_any_damage_to_a_real_answer_parses_or_is_dropped(data):
    packet = bytearray(zeroconf_response(9))
    for _ in range(data.draw(s.integers(1, 6))):
        place = data.draw(s.integers(0, len(packet) - 1))
        packet[place] = data.draw(s.integers(0, 255))
    packet = packet[:data.draw(s.integers(0, len(packet)))]
    parsed = st3._parse_mdns(bytes(packet))
    if parsed is not None:
        answers = st3._Tier2Answers()
        answers.add(parsed[1])
        for url in answers.urls():
            assert re.fullmatch(r"http://[0-9a-f.:\[\]]+:\d+/[A-Za-z0-9._~/-]*", url), url
        answers.questions()


# Location hints --------------------------------------------------------------


def hints_seen(server):
    """The location headers of the server's last request (names are case-blind)."""
    headers = {name.lower(): value for name, value in server.requests[-1][2].items()}
    return {name: headers.get(name.lower()) for name in ("X-Location", "X-ClientIP")}


def test_location_and_client_ip_reach_the_server_and_debug(cloudlet):
    result = run_cli("--json", "--debug", "--location", "40.4433,-79.9436", "--client-ip",
                     "192.168.1.20", cloudlet.url, "helloworld")
    assert result.returncode == 0, result.stderr
    headers = hints_seen(cloudlet)
    assert (headers["X-Location"], headers["X-ClientIP"]) == ("40.4433,-79.9436",
                                                              "192.168.1.20")
    assert "X-Location: 40.4433,-79.9436, X-ClientIP: 192.168.1.20" in result.stderr


def test_location_hints_come_from_the_environment_too(cloudlet):
    env = dict(os.environ, SINFONIA_LOCATION="-33.9,151.2", SINFONIA_CLIENT_IP="fd00::7")
    assert run_cli("--json", cloudlet.url, "helloworld", env=env).returncode == 0
    headers = hints_seen(cloudlet)
    assert (headers["X-Location"], headers["X-ClientIP"]) == ("-33.9,151.2", "fd00::7")
    st3.deploy(cloudlet.url, "helloworld", location=(10, 20), client_ip="10.0.0.9")
    headers = hints_seen(cloudlet)
    assert (headers["X-Location"], headers["X-ClientIP"]) == ("10.0,20.0", "10.0.0.9")


@pytest.mark.parametrize("args, env", [
    (["--location", "91,0"], {}),
    (["--location", "0,-180.5"], {}),
    (["--location", "nan,0"], {}),
    (["--location", "1,2,3"], {}),
    (["--location", "north"], {}),
    (["--client-ip", "fe80::1%eth0"], {}),
    (["--client-ip", "10.0.0.300"], {}),
    ([], {"SINFONIA_LOCATION": "0;0"}),
    ([], {"SINFONIA_CLIENT_IP": "localhost"}),
    (["--results", "4"], {}),
    (["--wait-for", "openrtist"], {}),
    (["--wait-for", "openrtist:0"], {}),
    (["--wait-for", "bad name:80"], {}),
])
def test_bad_hints_and_discovery_options_are_usage_errors(args, env):
    result = run_cli(*args, "http://127.0.0.1:9", "helloworld",
                     env=dict(os.environ, **env))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # argparse adds its usage line
    assert "Traceback" not in result.stderr


# Zeroconf inside a namespace of our own ------------------------------------

UPSTREAM_ENTRY = """
import sys
sys.path.insert(0, sys.argv[1])
import sinfonia_tier3 as st3
sys.exit(st3.sinfonia_tier3(sys.argv[2], "helloworld", [], config_debug=True, zeroconf=True))
"""


@pytest.fixture(scope="module")
def lan():
    """A namespace whose veth pair (both ends inside) is its local network:
    multicast on it never leaves the namespace."""
    if sessions.missing_root():
        pytest.skip(sessions.missing_root())
    with Namespace("st3z") as namespace:
        _, namespace.tier2_device = veth_pair(namespace, namespace, [f"{CLIENT_ADDRESS}/24"],
                                              [f"{TIER2_ADDRESS}/24"])
        yield namespace


@pytest.fixture
def fallback(lan):
    """A Tier 1 on the namespace's loopback, which --zeroconf falls back to."""
    with inside(lan):
        server = Cloudlet()
    with server:
        yield server


def tool_in(namespace, *args, cwd=None, env=None, timeout=60):
    """sinfonia-tier3 ARGS run inside `namespace`."""
    return subprocess.run(["ip", "netns", "exec", namespace.name, sys.executable, TOOL,
                           *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout, check=False)


@pytest.mark.e2e
def test_zeroconf_finds_the_tier2_python_zeroconf_announces(lan, fallback, tmp_path):
    require_programs("ip")
    with inside(lan):
        tier2 = Cloudlet(host=TIER2_ADDRESS)
    with tier2, announce_tier2(lan, TIER2_ADDRESS, tier2.url.rsplit(":", 1)[1]):
        result = tool_in(lan, "--zeroconf", "--json", "--debug", "--location", "1.5,2.5",
                         fallback.url, "helloworld")
        assert result.returncode == 0, result.stderr
        (deployment,) = json.loads(result.stdout)
        assert deployment["TunnelConfig"]["endpoint"] == tier2.wireguard.endpoint
        assert re.search(rf"debug: zeroconf: 1 Tier 2 found in \d+ ms, {tier2.url}/\n",
                         result.stderr), result.stderr
        ((method, path, _),) = tier2.requests
        assert method == "POST" and path.startswith(f"/api/v1/deploy/{HELLOWORLD}/")
        assert hints_seen(tier2) == {"X-Location": "1.5,2.5", "X-ClientIP": None}
        assert fallback.requests == []
        # The upstream entry point, as upstream's own callers use it.
        entry = subprocess.run(
            ["ip", "netns", "exec", lan.name, sys.executable, "-c", UPSTREAM_ENTRY, str(REPO),
             fallback.url],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
        assert entry.returncode == 0, entry.stderr
        assert f"Endpoint = {tier2.wireguard.endpoint}" in (tmp_path / "wg.conf").read_text()
        assert len(tier2.requests) == 2 and fallback.requests == []


@contextlib.contextmanager
def hostile_responder(namespace):
    """An mDNS responder on the namespace's veth that answers each query
    with every HOSTILE packet (the query's id put in) until the block ends;
    yields the list of the query ids it saw."""
    with inside(namespace):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 5353))
        index = socket.if_nametoindex(namespace.tier2_device)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        struct.pack("=4s4si", socket.inet_aton("224.0.0.251"), bytes(4), index))
    seen, stop = [], threading.Event()

    def answer():
        while not stop.is_set():
            if select.select([sock], [], [], 0.05)[0]:
                query, source = sock.recvfrom(9000)
                if query[:2] not in seen:
                    seen.append(query[:2])
                for packet in HOSTILE.values():
                    sock.sendto(query[:2] + packet[2:], source)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(5)
        sock.close()


@pytest.mark.e2e
def test_zeroconf_with_only_hostile_answers_falls_back_to_tier1(lan, fallback):
    require_programs("ip")
    with hostile_responder(lan) as queries:
        result = tool_in(lan, "--zeroconf", "--zeroconf-timeout", "1", "--json", fallback.url,
                         "helloworld")
    assert result.returncode == 0, result.stderr
    assert (f"sinfonia-tier3: no Tier 2 answered zeroconf within 1 s; asking {fallback.url}"
            in result.stderr.splitlines())
    assert json.loads(result.stdout)[0]["TunnelConfig"]["endpoint"] == \
        fallback.wireguard.endpoint
    assert len(fallback.requests) == 1
    assert len(queries) == 2  # asked at the start and again half way, each with its id


# Ranking by handshake --------------------------------------------------------

RELAY_DELAY = 0.4  # seconds each way: the slow cloudlet's round trip is at least 0.8 s


@pytest.fixture(scope="module")
def candidates():
    """Three deployments, worst first: a cloudlet whose endpoint nobody
    serves, one behind a relay that holds each datagram RELAY_DELAY s, one
    that answers at once."""
    if sessions.missing_root():
        pytest.skip(sessions.missing_root())
    with Candidates({"dead": None, "slow": RELAY_DELAY, "fast": 0}) as tier1:
        yield tier1


@pytest.mark.e2e
def test_the_fastest_handshake_wins_and_json_has_each_round_trip(candidates):
    result = run_cli("--json", "--results", "3", "--connect-timeout", "3", candidates.url,
                     "helloworld")
    assert result.returncode == 0, result.stderr
    documents = json.loads(result.stdout)
    assert [d["DeploymentName"] for d in documents] == ["fast", "slow", "dead"]
    trips = {d["DeploymentName"]: d["HandshakeMs"] for d in documents}
    assert trips["dead"] is None
    assert trips["slow"] >= 2 * RELAY_DELAY * 1000  # the relay holds it twice
    assert trips["fast"] is not None


@pytest.mark.e2e
def test_a_session_runs_through_the_fastest_and_debug_shows_each(candidates):
    require_programs("curl")
    result = run_cli("--results", "3", "--debug", candidates.url, "helloworld", "--",
                     "curl", "-sS", "--max-time", "10", "http://helloworld/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello from the sinfonia test cloudlet!")
    fast = candidates.endpoint("fast", st3._load_or_create_keypair(HELLOWORLD).public)
    assert f"tunnel endpoint {fast}" in result.stderr
    lines = re.findall(r"debug: handshake with \S+ \(.*", result.stderr)
    assert len(lines) == 3, result.stderr
    assert re.search(r"\(fast\): \d+\.\d ms$", lines[2])
    assert lines[0].endswith("(dead): no answer yet when the first one answered")


@pytest.mark.e2e
def test_no_candidate_answering_is_one_line_and_125(cloudlet):
    other = StaticWireGuard().tunnel_config_for(HELLOWORLD, bytes(32))
    cloudlet.rewrite = lambda deployments: [deployments[0],
                                            dict(deployments[0], TunnelConfig=other)]
    result = run_cli("--results", "2", "--connect-timeout", "1", cloudlet.url, "helloworld",
                     "true")
    assert result.returncode == 125
    assert result.stderr.splitlines()[-1] == (
        "sinfonia-tier3: none of the 2 candidate cloudlets answered a WireGuard handshake "
        "within 1 s: check that UDP to them gets through, or allow more time with "
        "--connect-timeout")


# Holding the application until the backend answers ---------------------------


@pytest.fixture(scope="module")
def wireguard_cloudlet():
    if sessions.missing_root():
        pytest.skip(sessions.missing_root())
    with WireGuardServer() as server, Cloudlet(wireguard=server) as api:
        yield server, api


@pytest.mark.e2e
def test_the_application_starts_once_a_late_backend_listens(wireguard_cloudlet, tmp_path):
    server, api = wireguard_cloudlet
    process = subprocess.Popen(
        [sys.executable, TOOL, "--wait-for", "helloworld:80", "--wait-for", "helloworld:9099",
         "--debug", api.url, "helloworld", "--", "sh", "-c", "echo started"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in process.stderr:  # the test's clock is the tool's own lines
            seen.append(line)
            if line.startswith("sinfonia-tier3: waiting for helloworld:9099 ... "):
                break
        assert re.fullmatch(r"sinfonia-tier3: waiting for helloworld:9099 \.\.\. \d+ s "
                            r"\(Connection refused\)\n", seen[-1]), seen
        server.namespace.listen(9099)
        stdout, rest = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, "".join(seen) + rest
    assert stdout == "started\n"
    assert "debug: the backend answered after" in rest


@pytest.mark.e2e
def test_a_backend_that_never_listens_keeps_the_application_from_starting(
        wireguard_cloudlet, tmp_path):
    _, api = wireguard_cloudlet
    marker = tmp_path / "started"
    result = run_cli("--wait-for", "helloworld:9098", "--ready-timeout", "2", api.url,
                     "helloworld", "touch", marker)
    assert result.returncode == 125
    assert result.stderr.splitlines()[-1] == (
        "sinfonia-tier3: the backend did not answer at helloworld:9098 within 2 s "
        "(Connection refused), so the application was not started: allow more time "
        "with --ready-timeout")
    assert not marker.exists()
