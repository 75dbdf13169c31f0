"""Our WireGuard datapath against an independent implementation, wireguard-go.

Each test builds two fresh network namespaces: `ours` holds the TUN device of
sinfonia_tier3.Datapath, `theirs` the TUN device of a wireguard-go process.
Both UDP sockets sit on the host's loopback. Nothing is mocked.

Protocol timers are shortened by setting the module's constants (the
whitepaper's names with a leading underscore) for the test's duration.
"""

import ipaddress
import os
import select
import socket
import threading
import time
from contextlib import ExitStack

import pytest
from netns import (
    Namespace,
    OurDatapath,
    Transfer,
    WireguardGo,
    exchange,
    generate_keypair,
    missing_requirements,
    veth_pair,
)

import sinfonia_tier3 as st3

# Root and /dev/net/tun; without wireguard-go or wg, WireguardGo fails the test.
_MISSING = missing_requirements()
pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(bool(_MISSING), reason=f"interop: {_MISSING}"),
]

OURS_V4, THEIRS_V4 = "10.99.0.1", "10.99.0.2"
OURS_V6, THEIRS_V6 = "fd99::1", "fd99::2"
OUR_ADDRESSES = [f"{OURS_V4}/24", f"{OURS_V6}/64"]
THEIR_ADDRESSES = [f"{THEIRS_V4}/24", f"{THEIRS_V6}/64"]
BULK = 50 << 20  # the 50 MiB each way


def networks(*addresses):
    """Host routes (/32, /128) for the addresses, as allowed IPs."""
    return [ipaddress.ip_network(address) for address in addresses]


def shorten_timers(monkeypatch, **seconds):
    """Set protocol constants, e.g. REKEY_TIMEOUT=1; a name the datapath
    does not have fails the test rather than silently testing nothing."""
    for name, value in seconds.items():
        monkeypatch.setattr(st3, f"_{name}", value, raising=True)


@pytest.fixture
def namespaces():
    with Namespace("st3o") as ours, Namespace("st3t") as theirs:
        yield ours, theirs


@pytest.fixture
def keys():
    return generate_keypair(), generate_keypair()


@pytest.fixture
def start_pair(namespaces, keys):
    """Builds the two peers; everything it built goes at teardown."""
    with ExitStack() as stack:
        yield lambda **options: _start_pair(*namespaces, keys, stack=stack, **options)


def _start_pair(
    ours_ns,
    theirs_ns,
    keys,
    *,
    stack,
    we_initiate=True,
    endpoint_host="127.0.0.1",
    listen_host="127.0.0.1",
    vnet_hdr=False,
    preshared_key=None,
):
    """wireguard-go in `theirs_ns`, our datapath in `ours_ns`, handshake done.

    As initiator we know their endpoint and they do not know ours (so only
    our side can restore a lost session); as responder it is the other way
    round and wireguard-go starts with a persistent keepalive.
    """
    (our_private, our_public), (their_private, their_public) = keys
    theirs = stack.enter_context(
        WireguardGo(theirs_ns, THEIR_ADDRESSES, private_key=their_private)
    )
    endpoint = (endpoint_host, theirs.listen_port) if we_initiate else None
    ours = stack.enter_context(
        OurDatapath(
            ours_ns,
            OUR_ADDRESSES,
            our_private,
            their_public,
            endpoint=endpoint,
            allowed_ips=networks(THEIRS_V4, THEIRS_V6),
            vnet_hdr=vnet_hdr,
            listen=(listen_host, 0),
            preshared_key=preshared_key,
        )
    )
    theirs.set_peer(
        our_public,
        allowed_ips=networks(OURS_V4, OURS_V6),
        endpoint=None if we_initiate else ours.endpoint,
        persistent_keepalive=0 if we_initiate else 1,
        preshared_key=preshared_key,
    )
    ours.start()
    ours.datapath.wait_for_handshake(10)
    return ours, theirs


def test_harness_wireguard_go_pair():
    """The harness itself, with no code of ours: wireguard-go on both sides."""
    with ExitStack() as stack:
        a = stack.enter_context(Namespace("st3o"))
        b = stack.enter_context(Namespace("st3t"))
        wg_a = stack.enter_context(WireguardGo(a, OUR_ADDRESSES))
        wg_b = stack.enter_context(WireguardGo(b, THEIR_ADDRESSES))
        wg_a.set_peer(
            wg_b.public_key,
            endpoint=wg_b.endpoint,
            allowed_ips=networks(THEIRS_V4, THEIRS_V6),
        )
        wg_b.set_peer(wg_a.public_key, allowed_ips=networks(OURS_V4, OURS_V6))
        exchange(b, THEIRS_V4, a, 4 << 20, timeout=30)
        assert wg_a.latest_handshake(wg_b.public_key) > 0


def test_harness_leaves_nothing_behind():
    """Namespaces, veth pairs, wireguard-go processes and their control
    sockets all go on close."""
    with Namespace("st3o") as a, Namespace("st3t") as b:
        veth_pair(a, b, ["10.98.0.1/30"], ["10.98.0.2/30"])
        exchange(b, "10.98.0.2", a, 1 << 20, timeout=30)
        wireguard_go = WireguardGo(a, OUR_ADDRESSES)
        socket_path = f"/var/run/wireguard/{wireguard_go.name}.sock"
        assert wireguard_go.name in a.ip("link", "show")
        wireguard_go.stop()
        assert not os.path.exists(socket_path)
        assert not wireguard_go.running
    assert not os.path.exists(a.path) and not os.path.exists(b.path)


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet_hdr"])
def test_we_initiate_bulk_both_ways(namespaces, keys, start_pair, vnet_hdr):
    ours_ns, theirs_ns = namespaces
    ours, theirs = start_pair(vnet_hdr=vnet_hdr)
    exchange(theirs_ns, THEIRS_V4, ours_ns, BULK, timeout=60)
    stats = ours.datapath.stats()
    assert stats["last_handshake"] is not None
    assert stats["rx_bytes"] >= BULK and stats["tx_bytes"] >= BULK
    their_rx, their_tx = theirs.transfer(keys[0][1])
    assert their_rx >= BULK and their_tx >= BULK


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet_hdr"])
def test_they_initiate_bulk_both_ways(namespaces, keys, start_pair, vnet_hdr):
    """We are the responder: no endpoint; wireguard-go knows ours and starts."""
    ours_ns, theirs_ns = namespaces
    ours, theirs = start_pair(we_initiate=False, vnet_hdr=vnet_hdr)
    exchange(ours_ns, OURS_V4, theirs_ns, BULK, timeout=60)
    assert theirs.latest_handshake(keys[0][1]) > 0
    # the endpoint we learned from their initiation
    assert ours.datapath.stats()["endpoint"] == theirs.endpoint


def test_rekey_from_our_side_with_traffic_flowing(
    namespaces, keys, start_pair, monkeypatch
):
    """REKEY_AFTER_TIME shortened to 2 s (REKEY_TIMEOUT, the least time
    between initiations, to 1 s): while data flows for about 7 s we start new
    handshakes (wireguard-go's own timers are 120 s, so every new one is
    ours) and not a byte is lost."""
    shorten_timers(
        monkeypatch, REKEY_AFTER_TIME=2, REJECT_AFTER_TIME=8, REKEY_TIMEOUT=1
    )
    ours_ns, theirs_ns = namespaces
    _, theirs = start_pair()
    handshakes = set()
    deadline = time.monotonic() + 7
    rounds = 0
    while time.monotonic() < deadline and rounds < 200:
        transfer = Transfer(theirs_ns, THEIRS_V4, ours_ns, 2 << 20, timeout=20)
        transfer.wait()
        handshakes.add(theirs.latest_handshake(keys[0][1]))
        rounds += 1
    assert len(handshakes) >= 3, (
        f"handshakes seen by wireguard-go: {sorted(handshakes)}"
    )


def test_wireguard_go_restarted_mid_transfer(namespaces, keys, start_pair, monkeypatch):
    """wireguard-go is killed and started again (same key and port, no
    memory of the session, and not told where we are): our side notices the
    silence and hands a new handshake; the TCP stream completes intact."""
    shorten_timers(monkeypatch, KEEPALIVE_TIMEOUT=1, REKEY_TIMEOUT=1)
    ours_ns, theirs_ns = namespaces
    _, theirs = start_pair()
    transfer = Transfer(theirs_ns, THEIRS_V4, ours_ns, 30 << 20, timeout=60)
    transfer.wait_until(5 << 20, 30)
    theirs.restart()
    transfer.wait()
    # a restarted wireguard-go knows only handshakes made since
    assert theirs.latest_handshake(keys[0][1]) > 0


def test_ipv6_inside_the_tunnel(namespaces, keys, start_pair):
    ours_ns, theirs_ns = namespaces
    start_pair()
    exchange(theirs_ns, THEIRS_V6, ours_ns, 8 << 20, timeout=30)
    exchange(ours_ns, OURS_V6, theirs_ns, 8 << 20, timeout=30)


def test_endpoint_given_by_name(namespaces, keys, start_pair):
    ours_ns, theirs_ns = namespaces
    ours, theirs = start_pair(endpoint_host="localhost")
    exchange(theirs_ns, THEIRS_V4, ours_ns, 4 << 20, timeout=30)
    host, port = ours.datapath.stats()["endpoint"]
    assert ipaddress.ip_address(host).is_loopback and port == theirs.listen_port


@pytest.mark.parametrize("we_initiate", [True, False], ids=["we", "they"])
def test_preshared_key(namespaces, keys, start_pair, we_initiate):
    ours_ns, theirs_ns = namespaces
    start_pair(we_initiate=we_initiate, preshared_key=os.urandom(32))
    exchange(theirs_ns, THEIRS_V4, ours_ns, 4 << 20, timeout=30)


def test_mismatched_preshared_key_gets_no_handshake(namespaces, keys):
    """Only their side has a preshared key: no session may come of it."""
    (our_private, our_public), (their_private, their_public) = keys
    ours_ns, theirs_ns = namespaces
    with WireguardGo(theirs_ns, THEIR_ADDRESSES, private_key=their_private) as theirs:
        theirs.set_peer(
            our_public, allowed_ips=networks(OURS_V4), preshared_key=os.urandom(32)
        )
        with OurDatapath(
            ours_ns,
            OUR_ADDRESSES,
            our_private,
            their_public,
            endpoint=theirs.endpoint,
            allowed_ips=networks(THEIRS_V4),
        ) as ours:
            ours.start()
            with pytest.raises(st3.TunnelError):
                ours.datapath.wait_for_handshake(2)
            assert ours.datapath.stats()["last_handshake"] is None
            assert theirs.latest_handshake(our_public) == 0


def test_garbage_to_our_port_changes_nothing(namespaces, keys, start_pair):
    """Random datagrams, and ones that look like each message type, sent to
    our UDP port while a transfer runs: dropped, the data arrives whole and
    the noise's address never becomes the peer's endpoint."""
    ours_ns, theirs_ns = namespaces
    ours, theirs = start_pair()
    transfer = Transfer(theirs_ns, THEIRS_V4, ours_ns, 8 << 20, timeout=30)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as noise:
        for i in range(2000):
            kind = bytes([i % 5, 0, 0, 0])
            size = (148, 92, 64, 32, 1500, 3, 0)[i % 7]
            noise.sendto((kind + os.urandom(size))[:size], ours.endpoint)
    transfer.wait()
    assert ours.datapath.stats()["endpoint"] == theirs.endpoint


def test_endpoint_over_ipv6(namespaces, keys, start_pair):
    """UDP between the peers over ::1 instead of 127.0.0.1."""
    ours_ns, theirs_ns = namespaces
    ours, theirs = start_pair(endpoint_host="::1", listen_host="::1")
    exchange(theirs_ns, THEIRS_V4, ours_ns, 4 << 20, timeout=30)
    host, port = ours.datapath.stats()["endpoint"]
    assert (host, port) == ("::1", theirs.listen_port)


def test_peer_that_never_answers(namespaces, keys, monkeypatch):
    """A UDP socket that only listens: initiations come REKEY_TIMEOUT apart
    (plus up to 1/3 s jitter), one retry per REKEY_TIMEOUT in
    REKEY_ATTEMPT_TIME, and waiting for the handshake ends in one clear
    TunnelError once the last retry went unanswered."""
    rekey_timeout, attempt_time = 1.0, 4.0
    shorten_timers(
        monkeypatch, REKEY_TIMEOUT=rekey_timeout, REKEY_ATTEMPT_TIME=attempt_time
    )
    ours_ns, _ = namespaces
    (our_private, _), (_, their_public) = keys
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    arrivals = []
    listening = threading.Event()
    listening.set()

    def listen():
        while listening.is_set():
            if select.select([silent], [], [], 0.2)[0]:
                arrivals.append((time.monotonic(), silent.recv(2048)))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        with OurDatapath(
            ours_ns,
            OUR_ADDRESSES,
            our_private,
            their_public,
            endpoint=silent.getsockname(),
            allowed_ips=networks(THEIRS_V4),
        ) as ours:
            # Down, so that no packet of the kernel's own (IPv6 router
            # solicitation, MLD) starts a fresh attempt after giving up.
            ours_ns.ip("link", "set", ours.name, "down")
            started = time.monotonic()
            ours.start()
            with pytest.raises(st3.TunnelError) as failure:
                ours.datapath.wait_for_handshake(attempt_time * 3)
            gave_up = time.monotonic() - started
            time.sleep(rekey_timeout * 2)  # time for a retry that must not come
    finally:
        listening.clear()
        listener.join(2)
        silent.close()

    message = str(failure.value)
    assert "\n" not in message and "handshake" in message.lower(), message
    assert all(len(data) == 148 and data[0] == 1 for _, data in arrivals), [
        (len(d), d[:4]) for _, d in arrivals
    ]
    times = [t - started for t, _ in arrivals]
    gaps = [times[i + 1] - times[i] for i in range(len(times) - 1)]
    # The first initiation goes at once, each retry REKEY_TIMEOUT plus up to
    # 1/3 s of jitter after the previous one (0.35 s slack for timer ticks
    # and a busy machine).
    assert times and times[0] < 0.5, times
    assert all(
        rekey_timeout - 0.05 <= gap <= rekey_timeout + 1 / 3 + 0.35 for gap in gaps
    ), gaps
    # Retrying stops after REKEY_ATTEMPT_TIME / REKEY_TIMEOUT retries, counted
    # as the kernel does so that the jitter cannot change how many, and nothing
    # follows; the error comes one REKEY_TIMEOUT (plus jitter) after the last,
    # not at the caller's much longer timeout.
    assert len(times) == 1 + attempt_time / rekey_timeout, times
    assert attempt_time - 0.2 <= times[-1], times
    assert (
        times[-1] + rekey_timeout - 0.05
        <= gave_up
        <= times[-1] + rekey_timeout + 1 / 3 + 0.5
    ), f"wait_for_handshake gave up after {gave_up:.1f} s: {message}"
