"""The userspace WireGuard protocol: two instances talking in one process
over a list that stands in for the network, with a clock the tests drive.

Nothing is mocked but the wire and the clock: keys, handshakes, cookies and
transport encryption are the real code paths the datapath runs. The last
tests run the real `Datapath` between two network namespaces (root only).
"""

import ipaddress
import json
import os
import random
import socket
import struct
from contextlib import ExitStack

import netns
import pytest
import sessions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sinfonia_tier3 as st3

A_ADDRESS = ("192.0.2.1", 51820)
B_ADDRESS = ("192.0.2.2", 51820)
A_IP, B_IP = "10.7.0.1", "10.7.0.2"


class Clock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Wall:
    """A wall clock (TAI64N timestamps) that the test can move too."""

    def __init__(self):
        self.ns = 1_700_000_000 * 10**9

    def __call__(self):
        return self.ns


def _ip_packet(source, destination, payload=b"x" * 20, protocol=17):
    """A minimal IPv4 packet (the protocol code looks at version, length, source)."""
    total = 20 + len(payload)
    header = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, protocol, 0,
        ipaddress.ip_address(source).packed, ipaddress.ip_address(destination).packed,
    )
    return header + payload


class End:
    """One side: the protocol state (`_Peer`) and its `_Sender`, wired to `net`."""

    def __init__(self, name, private, peer_public, address, net, clock, wall, *,
                 endpoint=None, allowed_ips=(), persistent_keepalive=0, preshared_key=None):
        self.name, self.address, self.net = name, address, net
        self.peer = st3._Peer(
            private, peer_public, endpoint=endpoint, allowed_ips=allowed_ips,
            persistent_keepalive=persistent_keepalive, preshared_key=preshared_key,
            clock=clock, wallclock_ns=wall,
        )
        self.peer.transmit = lambda message, to: net.append((address, to, bytes(message)))

        def emit(views, segment, to):
            assert all(len(v) == segment for v in views[:-1])
            for view in views:
                net.append((address, to, bytes(view)))

        self.sender = st3._Sender(self.peer.cipher, self.peer.counters, emit,
                                  self.peer.initiate, clock=clock, endpoint=endpoint)
        self.peer.sender = self.sender
        self.delivered = []

    def receive(self, message, source):
        self.peer.receive_datagram(message, source, self.peer.clock(), self._deliver)

    def _deliver(self, length):
        self.delivered.append(bytes(self.peer.plain[:length]))


class Pair:
    """A (initiator, knows B's endpoint) and B (responder), and the wire."""

    def __init__(self, **b_options):
        self.clock, self.wall, self.net = Clock(), Wall(), []
        a_private, a_public = netns.generate_keypair()
        b_private, b_public = netns.generate_keypair()
        self.a = End("a", a_private, b_public, A_ADDRESS, self.net, self.clock, self.wall,
                     endpoint=B_ADDRESS, allowed_ips=[f"{B_IP}/32"])
        self.b = End("b", b_private, a_public, B_ADDRESS, self.net, self.clock, self.wall,
                     allowed_ips=[f"{A_IP}/32"], **b_options)
        self.ends = {A_ADDRESS: self.a, B_ADDRESS: self.b}

    def take(self):
        """Everything on the wire, removed from it."""
        messages, self.net[:] = list(self.net), []
        return messages

    def deliver(self, messages, source=None):
        for frm, to, message in messages:
            self.ends[to].receive(message, source or frm)

    def pump(self, rounds=10):
        for _ in range(rounds):
            if not self.net:
                return
            self.deliver(self.take())

    def advance(self, seconds):
        self.clock.now += seconds
        self.wall.ns += int(seconds * 1e9)

    def tick(self):
        self.a.peer.tick()
        self.b.peer.tick()

    def handshake(self):
        self.a.peer.initiate()
        self.pump()
        assert self.a.peer.current is not None and self.b.peer.current is not None


def _kinds(messages):
    return [message[0] for _, _, message in messages]


# Handshake and transport #####################################################


def test_handshake_and_transport_both_ways():
    pair = Pair()
    pair.a.peer.initiate()
    initiation = pair.take()
    assert _kinds(initiation) == [1] and len(initiation[0][2]) == 148
    pair.deliver(initiation)
    response = pair.take()
    assert _kinds(response) == [2] and len(response[0][2]) == 92
    assert pair.b.peer.next is not None and pair.b.peer.current is None
    pair.deliver(response)
    assert pair.a.peer.current is not None
    confirmation = pair.take()  # the initiator's keepalive confirms the session
    assert _kinds(confirmation) == [4] and len(confirmation[0][2]) == 32
    pair.deliver(confirmation)
    assert pair.b.peer.current is not None and pair.b.peer.next is None
    assert pair.a.peer.current.send_key == pair.b.peer.current.receive_key
    assert pair.b.peer.current.send_key == pair.a.peer.current.receive_key

    to_b, to_a = _ip_packet(A_IP, B_IP), _ip_packet(B_IP, A_IP, b"y" * 1000)
    pair.a.sender.send_packet(to_b)
    pair.b.sender.send_packet(to_a)
    messages = pair.take()
    assert all(len(m) % 16 == 0 for _, _, m in messages)  # padded to 16
    pair.deliver(messages)
    assert pair.b.delivered == [to_b] and pair.a.delivered == [to_a]
    stats_a = pair.a.peer.counters
    assert stats_a[st3._LAST_HANDSHAKE_WALL] == pytest.approx(pair.wall.ns / 1e9)
    assert stats_a[st3._RX_BYTES] == len(messages[1][2])


def test_crossing_initiations_keep_the_session_keys_the_peer_still_sends_with():
    """Both ends initiate at once. B answers A's initiation (its session keys
    K1 wait for confirmation), then completes its own handshake (K2) before
    any of A's data on K1 has arrived: what A still sends on K1 must get
    through (the kernel keeps K1 as the previous session keys)."""
    pair = Pair()
    pair.a.peer.initiate()
    pair.deliver(pair.take())  # A's initiation reaches B
    response_to_a = pair.take()
    assert _kinds(response_to_a) == [2] and pair.b.peer.next is not None
    pair.b.peer.initiate()  # B knows A's endpoint from the initiation
    initiation_from_b = pair.take()
    assert _kinds(initiation_from_b) == [1]
    pair.deliver(response_to_a)  # A: K1 is current; its keepalive confirms K1
    held_on_k1 = pair.take()
    assert _kinds(held_on_k1) == [4]
    pair.deliver(initiation_from_b)
    pair.deliver(pair.take())  # A's response: B's own handshake completes (K2)
    assert pair.b.peer.current.initiator
    pair.take()  # B's keepalive on K2, not delivered yet
    packet = _ip_packet(A_IP, B_IP)
    pair.a.sender.send_packet(packet)  # A has no news of K2 being used: K1
    pair.deliver(held_on_k1 + pair.take())
    assert pair.b.delivered == [packet]


def test_preshared_key_must_match():
    psk = os.urandom(32)
    pair = Pair(preshared_key=psk)
    pair.a.peer.initiate()
    pair.pump()
    assert pair.a.peer.current is None  # B answered, but with keys A cannot confirm
    pair = Pair(preshared_key=psk)
    pair.a.peer.preshared_key = psk
    pair.handshake()


def test_packets_wait_for_the_handshake_then_flow():
    pair = Pair()
    packet = _ip_packet(A_IP, B_IP)
    pair.a.sender.send_packet(packet)  # no keys yet: queued, handshake requested
    assert _kinds(pair.net) == [1]
    pair.pump()
    assert pair.b.delivered == [packet]


def test_source_outside_allowed_ips_is_dropped():
    pair = Pair()
    pair.handshake()
    pair.a.sender.send_packet(_ip_packet("10.7.0.99", B_IP))
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP, b"ok"))
    pair.pump()
    assert pair.b.delivered == [_ip_packet(A_IP, B_IP, b"ok")]


def test_truncated_ip_packet_inside_tunnel_is_dropped():
    pair = Pair()
    pair.handshake()
    packet = bytearray(_ip_packet(A_IP, B_IP))
    packet[2:4] = struct.pack(">H", 500)  # claims more than there is
    pair.a.sender.send_packet(bytes(packet))
    pair.pump()
    assert pair.b.delivered == []


def test_ipv6_inner_packets():
    pair = Pair()
    pair.a.peer.allowed = st3._AllowedIPs(["fd00::/64"])
    pair.b.peer.allowed = st3._AllowedIPs(["fd00::1/128"])
    pair.handshake()
    payload = b"z" * 30
    packet = struct.pack(">IHBB16s16s", 6 << 28, len(payload), 17, 64,
                         ipaddress.ip_address("fd00::1").packed,
                         ipaddress.ip_address("fd00::2").packed) + payload
    pair.a.sender.send_packet(packet)
    spoofed = packet[:8] + ipaddress.ip_address("fd00::3").packed + packet[24:]
    pair.a.sender.send_packet(spoofed)
    pair.pump()
    assert pair.b.delivered == [packet]


# Replays #######################################################################


def test_replayed_data_packet_is_refused():
    pair = Pair()
    pair.handshake()
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP))
    messages = pair.take()
    pair.deliver(messages)
    pair.deliver(messages)
    assert len(pair.b.delivered) == 1


def test_replay_window_accepts_reordering_and_refuses_the_too_old():
    pair = Pair()
    pair.handshake()
    window = st3._REPLAY_WINDOW
    assert window >= 2048
    sent = []
    for i in range(window + 10):
        pair.a.sender.send_packet(_ip_packet(A_IP, B_IP, struct.pack(">I", i) * 5))
        sent.extend(pair.take())
    pair.deliver([sent[window + 9]])  # the newest first
    pair.deliver([sent[20]])  # within the window, late: accepted
    pair.deliver([sent[5]])  # more than the window behind: refused
    pair.deliver([sent[20]])  # again: refused
    assert len(pair.b.delivered) == 2


def test_replayed_initiation_is_refused():
    pair = Pair()
    pair.a.peer.initiate()
    initiation = pair.take()
    pair.deliver(initiation)
    response = pair.take()
    assert _kinds(response) == [2]
    session_keys = pair.b.peer.next
    pair.advance(1)
    pair.deliver(initiation)  # an attacker replays it later
    assert pair.take() == []
    assert pair.b.peer.next is session_keys


def test_older_initiation_is_refused():
    pair = Pair()
    pair.a.peer.initiate()
    older = pair.take()
    pair.advance(6)
    pair.a.peer.initiate(retry=True)  # the retransmission carries a newer timestamp
    newer = pair.take()
    pair.deliver(newer)
    assert _kinds(pair.take()) == [2]
    pair.advance(1)
    pair.deliver(older)
    assert pair.take() == []


def test_initiations_faster_than_the_rate_limit_are_refused():
    pair = Pair()
    pair.a.peer.initiate()
    first = pair.take()
    pair.a.peer.initiate(retry=True)  # a new timestamp, but 0 s later
    second = pair.take()
    pair.deliver(first + second)
    assert _kinds(pair.take()) == [2]


# Cookies under load ##############################################################


def test_flood_of_initiations_gets_cookies_and_an_echoing_client_gets_through():
    pair = Pair()
    flood = []
    for _ in range(st3._UNDER_LOAD_HANDSHAKES + 20):
        pair.a.peer.initiate(retry=True)
        flood.extend(pair.take())
    pair.deliver(flood)
    answers = pair.take()
    kinds = _kinds(answers)
    assert kinds.count(3) >= 20  # cookie replies once under load
    assert all(len(m) == 64 for _, _, m in answers if m[0] == 3)
    # The client honours the cookie of its last initiation: mac2 from now on.
    last_cookie = [a for a in answers if a[2][0] == 3][-1]
    pair.deliver([last_cookie])
    assert pair.a.peer.cookie_generator.cookie is not None
    pair.advance(0.5)  # still under load
    pair.a.peer.initiate(retry=True)
    retry = pair.take()
    assert retry[0][2][-16:] != bytes(16)  # mac2 present
    pair.deliver(retry)
    assert _kinds(pair.net) == [2]
    pair.pump()
    assert pair.a.peer.current is not None and pair.b.peer.current is not None


def test_without_cookie_under_load_no_response():
    pair = Pair()
    pair.b.peer.cookie_checker.under_load_until = pair.clock.now + 1.0
    pair.a.peer.initiate()
    pair.deliver(pair.take())
    assert _kinds(pair.take()) == [3]
    assert pair.b.peer.next is None


def test_cookie_from_another_address_does_not_pass():
    pair = Pair()
    pair.b.peer.cookie_checker.under_load_until = pair.clock.now + 1.0
    pair.a.peer.initiate()
    pair.deliver(pair.take())
    pair.deliver(pair.take())  # A takes the cookie for A_ADDRESS
    pair.a.peer.initiate(retry=True)
    pair.deliver(pair.take(), source=("198.51.100.7", 4000))  # the same bytes, elsewhere
    assert _kinds(pair.take()) == [3]


def test_under_load_each_source_is_rate_limited_even_with_a_cookie():
    pair = Pair()
    pair.b.peer.cookie_checker.under_load_until = pair.clock.now + 10
    pair.a.peer.initiate()
    pair.deliver(pair.take())
    pair.deliver(pair.take())  # the cookie
    pair.a.peer.initiate(retry=True)
    message = pair.take()[0][2]
    check = pair.b.peer.cookie_checker.check
    passed = [check(message, A_ADDRESS, pair.clock.now, pair.b.peer.transmit) for _ in range(10)]
    assert passed == [True] * st3._HANDSHAKE_BURST + [False] * (10 - st3._HANDSHAKE_BURST)
    assert pair.take() == []  # refused without a cookie reply
    pair.advance(1.0)  # the bucket refills
    assert check(message, A_ADDRESS, pair.clock.now, pair.b.peer.transmit)


# Timers ########################################################################


def test_initiation_retransmitted_with_jitter_then_given_up():
    pair = Pair()
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP))  # waits, asks for a handshake
    assert len(pair.a.sender.queue) == 1
    pair.take()  # lost
    pair.advance(st3._REKEY_TIMEOUT - 0.01)
    pair.tick()
    assert pair.take() == []
    pair.advance(0.5)  # REKEY_TIMEOUT plus at most a third of a second
    pair.tick()
    assert _kinds(pair.take()) == [1]
    attempts = 2
    for _ in range(40):
        pair.advance(st3._REKEY_TIMEOUT + 0.4)
        pair.tick()
        attempts += len(pair.take())
    assert pair.a.peer.handshake is None  # gave up after REKEY_ATTEMPT_TIME
    assert pair.a.sender.queue == []
    # The first initiation and one retry per REKEY_TIMEOUT in REKEY_ATTEMPT_TIME,
    # however long the jitter made each wait (as the kernel counts them).
    assert attempts == 1 + st3._REKEY_ATTEMPT_TIME / st3._REKEY_TIMEOUT


def test_rekey_after_time_when_sending_and_reject_after_time():
    pair = Pair()
    pair.handshake()
    old = pair.a.peer.current
    pair.advance(st3._REKEY_AFTER_TIME + 1)
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP))
    kinds = _kinds(pair.net)
    assert 4 in kinds and 1 in kinds  # still sent with the old key, and a rekey
    pair.pump()
    assert pair.a.peer.current is not old and pair.a.peer.previous is old
    # After REJECT_AFTER_TIME session keys no longer decrypt.
    pair.b.delivered.clear()
    pair.advance(st3._REJECT_AFTER_TIME)
    pair.b.peer.current.created = pair.clock.now - st3._REJECT_AFTER_TIME
    pair.a.peer.current.created = pair.clock.now  # the sender's own copy
    pair.a.sender.session_keys.created = pair.clock.now
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP))
    pair.deliver(pair.take())
    assert pair.b.delivered == []


def test_previous_session_keys_still_decrypt_after_rotation():
    pair = Pair()
    pair.handshake()
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP, b"old"))
    in_flight = pair.take()
    pair.advance(st3._REKEY_TIMEOUT + 1)
    pair.a.peer.initiate()
    pair.pump()
    assert pair.b.peer.previous is not None
    pair.deliver(in_flight)  # arrives late, under the previous session keys
    assert pair.b.delivered[-1] == _ip_packet(A_IP, B_IP, b"old")


def test_responder_keeps_next_until_the_initiator_uses_it():
    pair = Pair()
    pair.handshake()
    current = pair.b.peer.current
    pair.advance(st3._REKEY_TIMEOUT + 1)
    pair.a.peer.initiate()
    pair.deliver(pair.take())  # B answers; its new session keys wait as `next`
    assert pair.b.peer.current is current and pair.b.peer.next is not None
    pair.b.sender.send_packet(_ip_packet(B_IP, A_IP))
    assert pair.b.sender.session_keys is current  # B may not send with `next` yet
    pair.pump()
    assert pair.b.peer.current is not current and pair.b.peer.previous is current


def test_passive_keepalive_after_receiving_data():
    pair = Pair()
    pair.handshake()
    pair.advance(0.1)
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP))
    pair.pump()
    pair.advance(st3._KEEPALIVE_TIMEOUT - 1)
    pair.tick()
    assert pair.net == []
    pair.advance(1.5)
    pair.tick()
    keepalive = pair.take()
    assert [(frm, m[0], len(m)) for frm, _, m in keepalive] == [(B_ADDRESS, 4, 32)]
    pair.deliver(keepalive)  # which also answers A's data: A needs no new handshake
    pair.advance(st3._KEEPALIVE_TIMEOUT * 2)
    pair.tick()
    assert pair.net == []  # nothing new received: no further keepalives


def test_persistent_keepalive():
    pair = Pair()
    pair.a.peer.persistent_keepalive = 25
    pair.handshake()
    pair.advance(24)
    pair.tick()
    assert pair.net == []
    pair.advance(1.5)
    pair.tick()
    assert [(frm, m[0]) for frm, _, m in pair.take()] == [(A_ADDRESS, 4)]


def test_keepalive_due_on_expired_session_keys_asks_for_a_handshake():
    pair = Pair()
    pair.handshake()
    pair.b.peer.persistent_keepalive = 25
    pair.advance(st3._REJECT_AFTER_TIME + 1)
    pair.b.peer.tick()
    assert [(frm, m[0]) for frm, _, m in pair.take()] == [(B_ADDRESS, 1)]


def test_new_handshake_when_sent_data_goes_unanswered():
    pair = Pair()
    pair.handshake()
    pair.advance(1)
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP))
    pair.take()  # lost, and nothing comes back
    pair.advance(st3._KEEPALIVE_TIMEOUT + st3._REKEY_TIMEOUT - 0.5)
    pair.tick()
    assert pair.net == []
    pair.advance(1)
    pair.tick()
    assert _kinds(pair.take()) == [1]


def test_the_shared_counters_tell_how_long_the_peer_has_not_answered():
    # What Datapath.trouble reads to tell a lost tunnel.
    pair = Pair()
    counters = pair.a.peer.counters
    pair.a.peer.initiate()
    first = pair.clock.now
    pair.take()  # lost
    pair.advance(st3._REKEY_TIMEOUT + 0.5)
    pair.tick()  # retransmitted: unanswered since the first all the same
    assert counters[st3._HANDSHAKE_PENDING_SINCE] == first
    pair.pump()
    assert counters[st3._HANDSHAKE_PENDING_SINCE] == 0
    assert counters[st3._UNANSWERED_SINCE] == 0  # the keepalive that confirms is no data
    pair.advance(1)
    sent = pair.clock.now
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP))
    pair.advance(1)
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP))
    assert counters[st3._UNANSWERED_SINCE] == sent  # the first data without an answer
    pair.pump()
    pair.advance(1)
    pair.b.sender.send_packet(_ip_packet(B_IP, A_IP))
    pair.pump()
    assert counters[st3._UNANSWERED_SINCE] == 0
    assert counters[st3._LAST_RECEIVED] == pair.clock.now


def test_keys_zeroed_after_three_times_reject_after_time():
    pair = Pair()
    pair.handshake()
    pair.advance(3 * st3._REJECT_AFTER_TIME + 1)
    pair.tick()
    assert pair.a.peer.current is None and pair.b.peer.current is None
    assert pair.a.sender.session_keys is None
    assert all(keys is None for keys in pair.b.peer.session_keys_by_index.values())


# Endpoints ########################################################################


def test_endpoint_follows_the_roaming_peer():
    pair = Pair()
    pair.handshake()
    assert pair.b.peer.endpoint == A_ADDRESS
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP))
    roamed = ("198.51.100.9", 40000)
    pair.deliver(pair.take(), source=roamed)
    assert pair.b.peer.endpoint == roamed and pair.b.sender.endpoint == roamed
    # An unauthenticated packet from elsewhere does not move it.
    pair.deliver([(("203.0.113.5", 1), B_ADDRESS, os.urandom(64))])
    assert pair.b.peer.endpoint == roamed


def test_session_keys_and_endpoint_change_before_the_packet_is_delivered():
    """The datapath's encrypting process may meet an answer to a packet as soon
    as the packet is delivered: the news it brings (session keys confirmed, peer
    roamed) must reach the sender first."""
    pair = Pair()
    pair.handshake()
    pair.advance(st3._REKEY_TIMEOUT + 1)
    pair.a.peer.initiate()  # a new handshake: B keeps its session keys as `next`
    pair.deliver(pair.take())  # B answers
    pair.deliver(pair.take())  # A takes the new session keys
    assert _kinds(pair.take()) == [4]  # and its keepalive is lost
    assert pair.b.peer.next is not None
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP))
    roamed = ("198.51.100.9", 40000)
    seen = []
    (_, _, message), = pair.take()
    pair.b.peer.receive_datagram(message, roamed, pair.clock(), lambda length: seen.append(
        (pair.b.sender.session_keys is pair.b.peer.current, pair.b.sender.endpoint)))
    assert pair.b.peer.next is None
    assert seen == [(True, roamed)]


def test_endpoint_names_and_families_resolve():
    import socket

    v4 = st3._udp_socket(("127.0.0.1", 0), None)
    v6 = st3._udp_socket(None, None)
    try:
        assert st3._resolve_endpoint(v4, ("localhost", 5)) == ("127.0.0.1", 5)
        assert st3._resolve_endpoint(v6, ("127.0.0.1", 5))[:2] == ("::ffff:127.0.0.1", 5)
        assert st3._resolve_endpoint(v6, ("::1", 5))[:2] == ("::1", 5)
        with pytest.raises(st3.TunnelError):
            st3._resolve_endpoint(v4, ("name.invalid", 5))
        assert v6.family == socket.AF_INET6
    finally:
        v4.close()
        v6.close()


# Hostile input #################################################################


def _state(peer):
    """Everything a message could change (the load meter aside: it counts
    handshake messages that carry a valid mac1, which is its job)."""
    session_keys = {
        index: None if keys is None else (keys.replay_top, keys.created, tuple(keys.replay_ring))
        for index, keys in peer.session_keys_by_index.items()
    }
    return (
        session_keys, peer.current, peer.previous, peer.next, peer.handshake,
        peer.last_timestamp, peer.endpoint, peer.cookie_generator.cookie, peer.last_received,
        peer.last_data_received, tuple(peer.counters), peer.last_handshake,
    )


def _established():
    """A pair that has done a handshake and exchanged data, and samples of
    every message type that went over the wire."""
    pair = Pair()
    pair.b.peer.cookie_checker.under_load_until = pair.clock.now + 0.5
    pair.a.peer.initiate()
    initiation = pair.take()
    pair.deliver(initiation)
    cookie = pair.take()
    pair.deliver(cookie)
    pair.advance(1)
    pair.a.peer.initiate(retry=True)
    initiation = pair.take()
    pair.deliver(initiation)
    response = pair.take()
    pair.deliver(response)
    pair.pump()
    assert pair.a.peer.current is not None and pair.b.peer.current is not None
    pair.a.sender.send_packet(_ip_packet(A_IP, B_IP))
    data = pair.take()
    pair.deliver(data)
    samples = [m for _, _, m in initiation + response + cookie + data]
    return pair, samples


_FUZZ = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_datagrams(datagram):
    pair, _ = _established()
    for end in (pair.a, pair.b):
        before = _state(end.peer)
        end.receive(datagram, ("203.0.113.5", 9))
        assert _state(end.peer) == before
    assert pair.net == [] or all(m[0] == 3 for _, _, m in pair.net)


@_FUZZ
@given(st.data())
def test_fuzz_truncated_and_bit_flipped_messages(data):
    pair, samples = _established()
    message = bytearray(data.draw(st.sampled_from(samples)))
    if data.draw(st.booleans()):
        message = message[:data.draw(st.integers(0, len(message) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            bit = data.draw(st.integers(0, len(message) * 8 - 1))
            message[bit // 8] ^= 1 << (bit % 8)
    for end in (pair.a, pair.b):
        before = _state(end.peer)
        end.receive(bytes(message), ("203.0.113.5", 9))
        assert _state(end.peer) == before
        assert end.delivered[1:] == []


@_FUZZ
@given(st.binary(min_size=16, max_size=200), st.sampled_from([1, 2, 3, 4]))
def test_fuzz_messages_with_valid_type_and_random_body(body, kind):
    pair, _ = _established()
    for size in (148, 92, 64, len(body) + 16):
        message = (struct.pack("<I", kind) + body * 8)[:size]
        for end in (pair.a, pair.b):
            before = _state(end.peer)
            end.receive(message, ("203.0.113.5", 9))
            assert _state(end.peer) == before


# The TUN writer ################################################################

V6_A_IP, V6_B_IP = "fd00:7::1", "fd00:7::2"
ACK, PSH = st3._TCP_ACK, st3._TCP_PSH
VNET = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset


def _tcp_segment(version, seq, payload, *, flags=ACK, ports=(40000, 80), options=b"",
                 data_offset=None):
    """A TCP segment from A to B over IPv4 (no IP options) or IPv6; the data
    offset fits the options unless given."""
    if data_offset is None:
        data_offset = 5 + len(options) // 4
    tcp = struct.pack(">HHIIBBHHH", *ports, seq, 7, data_offset << 4, flags, 512, 0, 0)
    tcp += options + payload
    if version == 4:
        return _ip_packet(A_IP, B_IP, tcp, protocol=6)
    return struct.pack(">IHBB16s16s", 6 << 28, len(tcp), 6, 64,
                       ipaddress.ip_address(V6_A_IP).packed,
                       ipaddress.ip_address(V6_B_IP).packed) + tcp


def _through_tun_writer(packets, vnet_hdr):
    """Every write a `_TunWriter` makes for `packets`, each put at the start
    of a buffer full of stale bytes. A SOCK_SEQPACKET socketpair stands in
    for the TUN device: like it, and unlike a pipe, it keeps each write one
    message. It is drained after every packet, so that writes never block."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    frames = []

    def drain():
        while True:
            try:
                frames.append(theirs.recv(1 << 17, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return

    with ours, theirs:
        plain = bytearray(random.Random(len(packets)).randbytes(65536))
        writer = st3._TunWriter(ours.fileno(), plain, vnet_hdr)
        for packet in packets:
            plain[:len(packet)] = packet
            writer.write(len(packet))
            drain()
        writer.flush()
        drain()
    return frames


@pytest.mark.parametrize("data_offset", [0, 4])
@pytest.mark.parametrize("version", [4, 6])
def test_tun_writer_sends_a_tcp_header_below_20_bytes_alone(version, data_offset):
    """Such a header gave `_flow_layout` a negative options size: the
    struct.error killed the decrypting worker."""
    packet = _tcp_segment(version, 1, b"x" * 100, data_offset=data_offset)
    assert _through_tun_writer([packet], vnet_hdr=True) == [bytes(VNET.size) + packet]


def _masked(packet, ip_size, header_size, *spans):
    """The headers of a TCP packet without lengths, checksums, TCP flags and
    `spans` (byte ranges)."""
    header = bytearray(packet[:header_size])
    lengths = [(2, 4), (10, 12)] if ip_size == 20 else [(4, 6)]
    for start, end in lengths + [(ip_size + 13, ip_size + 14), (ip_size + 16, ip_size + 18),
                                 *spans]:
        header[start:end] = bytes(end - start)
    return bytes(header)


def _assert_gso_frame(frame, segments):
    """`frame` (virtio_net_hdr first) is what the kernel cuts back into
    `segments`: their payloads in order, the first one's headers but for
    lengths, checksums and PSH, consecutive sequence numbers, checksums for
    the kernel to finish."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET.unpack_from(frame)
    body = frame[VNET.size:]
    ip_size = {st3._VNET_GSO_TCPV4: 20, st3._VNET_GSO_TCPV6: 40}[gso_type]
    assert (flags, csum_start, csum_offset) == (st3._VNET_NEEDS_CSUM, ip_size, 16)
    first = segments[0]
    assert len(segments) >= 2 and _masked(body, ip_size, hdr_len) == _masked(first, ip_size, hdr_len)
    seq = struct.unpack_from(">I", first, ip_size + 4)[0]
    id_and_seq = [(4, 6)] if ip_size == 20 else []
    id_and_seq.append((ip_size + 4, ip_size + 8))
    for segment in segments:
        if ip_size == 20:  # no IP options, not a fragment, TCP
            assert segment[0] == 0x45 and segment[6] & 0x3F == segment[7] == 0 and segment[9] == 6
        else:
            assert segment[0] >> 4 == 6 and segment[6] == 6
        assert hdr_len - ip_size == (segment[ip_size + 12] >> 4) * 4 >= 20
        assert _masked(segment, ip_size, hdr_len, *id_and_seq) == _masked(
            first, ip_size, hdr_len, *id_and_seq)
        assert struct.unpack_from(">I", segment, ip_size + 4)[0] == seq
        size = len(segment) - hdr_len
        assert 0 < size <= gso_size and (size == gso_size or segment is segments[-1])
        seq = (seq + size) & 0xFFFFFFFF
        assert segment[ip_size + 13] in ((ACK, ACK | PSH) if segment is segments[-1] else (ACK,))
    assert body[hdr_len:] == b"".join(segment[hdr_len:] for segment in segments)
    assert body[ip_size + 13] == first[ip_size + 13] | segments[-1][ip_size + 13]
    if ip_size == 20:
        assert struct.unpack_from(">H", body, 2)[0] == len(body)
        assert st3._fold(sum(struct.unpack_from(">10H", body))) == 0xFFFF
        pseudo = sum(struct.unpack_from(">4H", body, 12)) + 6 + len(body) - 20
    else:
        assert struct.unpack_from(">H", body, 4)[0] == len(body) - 40
        pseudo = sum(struct.unpack_from(">16H", body, 8)) + 6 + len(body) - 40
    assert struct.unpack_from(">H", body, ip_size + 16)[0] == st3._fold(pseudo)


def _assert_frames_stand_for(frames, packets, vnet_hdr):
    """Every packet, in order, went out either unchanged in a frame of its
    own or inside a GSO frame with the segments it follows."""
    if not vnet_hdr:
        assert frames == packets
        return
    left = list(packets)
    for frame in frames:
        header = VNET.unpack_from(frame)
        if header == (0, 0, 0, 0, 0, 0):
            assert frame[VNET.size:] == left.pop(0)
            continue
        payload_size, hdr_len, taken = len(frame) - VNET.size - header[2], header[2], 0
        count = 0
        while taken < payload_size:
            taken += len(left[count]) - hdr_len
            count += 1
        _assert_gso_frame(frame, left[:count])
        del left[:count]
    assert left == []


@pytest.mark.parametrize("version", [4, 6])
def test_tun_writer_coalesces_a_burst_of_one_flow(version):
    payloads = [os.urandom(1000) for _ in range(5)] + [os.urandom(300)]
    seqs = [1000 * number for number in range(6)]
    burst = [_tcp_segment(version, seq, payload) for seq, payload in zip(seqs, payloads)]
    other_flow = _tcp_segment(version, 0, b"y" * 1000, ports=(40001, 80))
    packets = [*burst[:3], other_flow, *burst[3:]]
    frames = _through_tun_writer(packets, vnet_hdr=True)
    assert len(frames) == 3 and frames[1] == bytes(VNET.size) + other_flow
    _assert_gso_frame(frames[0], burst[:3])
    _assert_gso_frame(frames[2], burst[3:])
    _assert_frames_stand_for(frames, packets, vnet_hdr=True)
    assert _through_tun_writer(packets, vnet_hdr=False) == packets


# Flows of the fuzzed writer input: IP version, TCP ports, TCP options. The
# last one sends only first fragments (more-fragments set), never to coalesce.
_TIMESTAMPS = b"\x01\x01\x08\x0a" + bytes(range(8))
_FLOWS = [(4, (40000, 80), b""), (4, (40001, 80), _TIMESTAMPS),
          (6, (40000, 80), b""), (6, (40001, 80), _TIMESTAMPS), (4, (40002, 80), b"")]


def _malformed(draw, packet, version):
    """`packet` broken in one of the ways a hostile or buggy peer could."""
    packet, ip_size = bytearray(packet), 20 if version == 4 else 40
    how = draw(st.sampled_from(["truncated", "short data offset", "long data offset",
                                "fragment", "not plain TCP", "bit flip"]))
    if how == "truncated":  # as the IP header says: the writer trusts its length
        del packet[draw(st.integers(ip_size, len(packet) - 1)):]
        struct.pack_into(">H", packet, 2 if version == 4 else 4,
                         len(packet) - (0 if version == 4 else 40))
    elif how == "short data offset":
        packet[ip_size + 12] = draw(st.integers(0, 4)) << 4
    elif how == "long data offset":
        packet[ip_size + 12] = draw(st.integers(6, 15)) << 4
    elif how == "fragment" and version == 4:
        packet[6] |= draw(st.sampled_from([0x20, 0x01]))  # more fragments, or an offset
    elif how == "fragment":
        packet[6] = 44  # a fragment header
    elif how == "not plain TCP" and version == 4:
        packet[0] = 0x46  # IP options
    elif how == "not plain TCP":
        packet[6] = 0  # hop-by-hop options
    else:
        bit = draw(st.integers(0, min(len(packet), 80) * 8 - 1))
        packet[bit // 8] ^= 1 << (bit % 8)
    return bytes(packet)


@st.composite
def _writer_input(draw):
    """Up to 30 IP packets of up to 65535 bytes: TCP segments of five flows,
    mostly of the flow's segment size with consecutive sequence numbers (so
    that they coalesce), some malformed, and random bytes, some of them
    looking like a TCP segment at first glance."""
    segment_sizes = [draw(st.sampled_from([1, 536, 1380, 9000, 40000])) for _ in _FLOWS]
    next_seqs = [draw(st.sampled_from([0, 2**32 - 1500]) | st.integers(0, 2**32 - 1))
                 for _ in _FLOWS]
    packets, flow = [], 0
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["segment"] * 8 + ["random", "TCP-like random"]))
        if kind != "segment":
            packet = bytearray(random.Random(draw(st.integers(0, 2**32))).randbytes(
                draw(st.integers(0, 80) | st.integers(0, 65535))))
            if kind == "TCP-like random" and len(packet) >= 60:
                if draw(st.booleans()):
                    packet[0], packet[6:8], packet[9], packet[33] = 0x45, b"\0\0", 6, ACK
                else:
                    packet[0], packet[6], packet[53] = 0x60, 6, ACK
            packets.append(bytes(packet))
            continue
        if draw(st.integers(0, 3)) == 0:
            flow = draw(st.integers(0, len(_FLOWS) - 1))
        version, ports, options = _FLOWS[flow]
        room = 65535 - (20 if version == 4 else 40) - 20 - len(options)
        size = min(room, draw(st.sampled_from(["full"] * 6 + ["short", "empty", "long"]).map(
            {"full": segment_sizes[flow], "short": segment_sizes[flow] // 2,
             "empty": 0, "long": segment_sizes[flow] + 1}.get)))
        seq = next_seqs[flow]
        if draw(st.integers(0, 9)) == 0:
            seq = (seq + draw(st.sampled_from([-1000, -1, 1, 1000]))) & 0xFFFFFFFF
        next_seqs[flow] = (seq + size) & 0xFFFFFFFF
        flags = draw(st.sampled_from([ACK] * 8 + [ACK | PSH] * 2 + [0x12, 0x11, 0x90, 0x04]))
        payload = random.Random(len(packets)).randbytes(size)
        packet = _tcp_segment(version, seq, payload, flags=flags, ports=ports, options=options)
        if flow == len(_FLOWS) - 1:
            packet = packet[:6] + bytes([packet[6] | 0x20]) + packet[7:]
        if draw(st.integers(0, 7)) == 0:
            packet = _malformed(draw, packet, version)
        packets.append(packet)
    return packets


@_FUZZ
@given(_writer_input(), st.booleans())
def test_fuzz_tun_writer(packets, vnet_hdr):
    frames = _through_tun_writer(packets, vnet_hdr)
    _assert_frames_stand_for(frames, packets, vnet_hdr)


@pytest.fixture(scope="module")
def real_tun():
    """A TUN device with a virtio_net_hdr, up in a namespace of its own whose
    addresses the fuzzed packets are not for: the kernel takes and counts
    each write, then drops the packet. Yields the descriptor and a function
    returning the device's receive counters."""
    _require_namespaces()
    with netns.Namespace("st3wt") as namespace:
        name = netns.unique_name("st3tun")
        fd = st3._open_tun(name, vnet_hdr=True)
        try:
            netns.move_link(name, namespace)
            namespace.add_addresses(name, ["10.7.0.9/24", "fd00:7::9/64"])

            def received():
                [link] = json.loads(namespace.ip("-j", "-s", "-s", "link", "show", "dev", name))
                return link["stats64"]["rx"]

            yield fd, received
        finally:
            os.close(fd)


@settings(_FUZZ, max_examples=100)
@given(_writer_input())
def test_fuzz_tun_writer_on_a_real_tun_device(real_tun, packets):
    """The kernel takes every frame the writer makes that holds an IP
    packet (the GSO ones too: no frame errors) and only those."""
    fd, received = real_tun
    frames = _through_tun_writer(packets, vnet_hdr=True)  # what the writer makes of them
    taken = [frame for frame in frames
             if len(frame) > VNET.size and frame[VNET.size] >> 4 in (4, 6)]
    before = received()
    writer = st3._TunWriter(fd, bytearray(65536), vnet_hdr=True)
    for packet in packets:
        writer.plain[:len(packet)] = packet
        writer.write(len(packet))
    writer.flush()
    after = received()
    assert after["frame_errors"] == before["frame_errors"]
    assert after["packets"] - before["packets"] == len(taken)
    assert after["bytes"] - before["bytes"] == sum(len(frame) - VNET.size for frame in taken)
    assert after["dropped"] - before["dropped"] == len(frames) - len(taken)


# The transport cipher's two paths ##############################################


def test_cffi_and_bindings_ciphers_agree():
    via_lib, via_bindings = st3._TransportCipher(), st3._TransportCipher(use_lib=False)
    assert via_lib.use_lib and not via_bindings.use_lib
    key, plaintext = os.urandom(32), os.urandom(1424)
    sealed = []
    for cipher in (via_lib, via_bindings):
        buffer = bytearray(plaintext + bytes(16))
        cipher.seal(key, 7, cipher.slot(buffer, 0), len(plaintext))
        sealed.append(bytes(buffer))
        out = bytearray(2000)
        assert cipher.open(key, 7, cipher.slot(buffer, 0), 0, len(buffer),
                           cipher.slot(out, 0)) == len(plaintext)
        assert bytes(out[:len(plaintext)]) == plaintext
        buffer[100] ^= 1
        assert cipher.open(key, 7, cipher.slot(buffer, 0), 0, len(buffer),
                           cipher.slot(out, 0)) is None
    assert sealed[0] == sealed[1]


# RFC 7748 §6.1: Alice's private key, Bob's public key, and what they share.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_sodium_through_cffi_lib_and_through_bindings_agree():
    """pynacl's cffi lib is not a public API; where it is missing, nacl.bindings
    must give the same results, refusals included."""
    via_lib, via_bindings = st3._Sodium(), st3._Sodium(use_lib=False)
    assert via_lib.lib is not None and via_bindings.lib is None
    for sodium in (via_lib, via_bindings):
        assert sodium.public_key(ALICE_PRIVATE) == ALICE_PUBLIC
        assert sodium.dh(ALICE_PRIVATE, BOB_PUBLIC) == SHARED
        assert sodium.dh(ALICE_PRIVATE, bytes(32)) == bytes(32)  # low order
        with pytest.raises(ValueError):
            sodium.dh(ALICE_PRIVATE, BOB_PUBLIC[:31])  # C would read past it
        with pytest.raises(ValueError):
            sodium.seal(bytes(32), bytes(11), b"", b"")
    for nonce_size in (12, 24):  # ChaCha20-Poly1305 and XChaCha20-Poly1305
        key, nonce = os.urandom(32), os.urandom(nonce_size)
        for size in (0, 1, 1500):
            plaintext, ad = os.urandom(size), os.urandom(32)
            sealed = via_lib.seal(key, nonce, plaintext, ad)
            assert len(sealed) == size + 16
            assert via_bindings.seal(key, nonce, bytearray(plaintext), ad) == sealed
            for sodium in (via_lib, via_bindings):
                assert sodium.open(key, nonce, memoryview(sealed), ad) == plaintext
                assert sodium.open(key, nonce, sealed, ad[1:]) is None
                assert sodium.open(key, nonce, sealed[:-1], ad) is None
                assert sodium.open(key, nonce, sealed[:15], ad) is None


# The Datapath between two namespaces ###########################################


def _require_namespaces():
    reason = netns.missing_requirements()
    if reason:
        pytest.skip(reason)


def _udp_echo_once(address, port):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, port))
        sock.settimeout(10)
        data, peer = sock.recvfrom(2048)
        sock.sendto(data[::-1], peer)
    return data


def _udp_ask(address, port, payload):
    import socket
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sock.sendto(payload, (address, port))
            try:
                return sock.recvfrom(2048)[0]
            except OSError:
                continue
    return None


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain-tun", "vnet-hdr"])
def test_datapath_between_namespaces(vnet_hdr):
    _require_namespaces()
    (a_private, a_public), (b_private, b_public) = netns.generate_keypair(), netns.generate_keypair()
    with ExitStack() as stack:
        ns_a = stack.enter_context(netns.Namespace("st3wa"))
        ns_b = stack.enter_context(netns.Namespace("st3wb"))
        b = stack.enter_context(netns.OurDatapath(
            ns_b, [f"{B_IP}/24", "fd00:7::2/64"], b_private, a_public,
            allowed_ips=[f"{A_IP}/32", "fd00:7::1/128"], vnet_hdr=vnet_hdr))
        a = stack.enter_context(netns.OurDatapath(
            ns_a, [f"{A_IP}/24", "fd00:7::1/64"], a_private, b_public,
            allowed_ips=[f"{B_IP}/32", "fd00:7::2/128"], endpoint=b.endpoint,
            vnet_hdr=vnet_hdr))
        stray_read, stray_write = os.pipe()  # the caller's: workers must not hold it
        stack.callback(os.close, stray_read)
        stack.callback(os.close, stray_write)
        b.start()
        a.start()
        a.datapath.wait_for_handshake(10)
        for pid in a.datapath._workers:
            assert os.readlink(f"/proc/self/fd/{stray_write}") not in sessions.held_files(pid)
        echo = ns_b.fork(_udp_echo_once, B_IP, 7007)
        answer = ns_a.fork(_udp_ask, B_IP, 7007, b"hello through the tunnel")
        assert answer.result(20) == b"lennut eht hguorht olleh"
        assert echo.result(5) == b"hello through the tunnel"
        netns.exchange(ns_b, B_IP, ns_a, 8 << 20)  # TCP, checksummed, both ways
        netns.exchange(ns_b, "fd00:7::2", ns_a, 4 << 20)  # and over IPv6
        stats = a.datapath.stats()
        assert stats["endpoint"] == b.endpoint
        assert stats["tx_bytes"] > 8 << 20 and stats["rx_bytes"] > 8 << 20
        assert stats["last_handshake"] is not None
        assert b.datapath.stats()["endpoint"] == a.endpoint
        workers = list(a.datapath._workers)
        a.datapath.stop()
        a.datapath.stop()  # idempotent
        for pid in workers:
            with pytest.raises(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _udp_ask_once(address, port, payload, timeout):
    """One question, no retransmission: the answer, or None after `timeout` s."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload, (address, port))
        try:
            return sock.recvfrom(2048)[0]
        except OSError:
            return None


def test_rerun_initiator_gets_the_answer_to_its_first_packet():
    """A client re-run with the same key (new process, new port, new
    handshake) whose first packet asks something: the answer must go out
    under the new session keys, to the new endpoint. The responder's encrypting
    process is held stopped (SIGSTOP) until the answer waits in its TUN
    behind the control process's news of those session keys: the order the
    scheduler sometimes picks on a loaded machine, made certain here."""
    import signal
    import time

    _require_namespaces()
    (a_private, a_public), (b_private, b_public) = netns.generate_keypair(), netns.generate_keypair()
    with ExitStack() as stack:
        ns_a = stack.enter_context(netns.Namespace("st3wa"))
        ns_b = stack.enter_context(netns.Namespace("st3wb"))
        b = stack.enter_context(netns.OurDatapath(
            ns_b, [f"{B_IP}/24"], b_private, a_public, allowed_ips=[f"{A_IP}/32"]))
        b.start()

        def client():
            return netns.OurDatapath(ns_a, [f"{A_IP}/24"], a_private, b_public,
                                     allowed_ips=[f"{B_IP}/32"], endpoint=b.endpoint)

        with client() as first:  # the first run: B's current session keys are its
            first.start()
            echo = ns_b.fork(_udp_echo_once, B_IP, 7007)
            assert ns_a.fork(_udp_ask, B_IP, 7007, b"first run").result(20) == b"nur tsrif"
            echo.result(5)
        encrypting = b.datapath._workers[0]
        os.kill(encrypting, signal.SIGSTOP)
        stack.callback(os.kill, encrypting, signal.SIGCONT)
        echo = ns_b.fork(_udp_echo_once, B_IP, 7007)
        rerun = stack.enter_context(client())
        rerun.start()
        answer = ns_a.fork(_udp_ask_once, B_IP, 7007, b"second run", 15)
        assert echo.result(20) == b"second run"  # handshake done, answer in B's TUN
        time.sleep(0.5)  # the echo's answer is queued on the TUN device by now
        os.kill(encrypting, signal.SIGCONT)
        assert answer.result(25) == b"nur dnoces"
        assert b.datapath.stats()["endpoint"] == rerun.endpoint


def test_wait_for_handshake_has_a_deadline():
    import socket
    import time

    _require_namespaces()
    (a_private, _), (_, b_public) = netns.generate_keypair(), netns.generate_keypair()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # takes datagrams, never answers
        with netns.Namespace("st3wa") as ns_a, netns.OurDatapath(
                ns_a, [f"{A_IP}/24"], a_private, b_public, allowed_ips=[f"{B_IP}/32"],
                endpoint=silent.getsockname()) as a:
            a.start()
            started = time.monotonic()
            with pytest.raises(st3.TunnelError, match="no WireGuard handshake"):
                a.datapath.wait_for_handshake(1.5)
            assert 1.4 <= time.monotonic() - started < 5
            assert silent.recv(2048)[0] == 1  # it did try: an initiation
            assert a.datapath.stats()["last_handshake"] is None
