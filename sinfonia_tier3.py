"""sinfonia-tier3: get an edge backend deployed on a nearby cloudlet and run the
application inside a private network namespace whose only way out is a
WireGuard tunnel to that backend, without root.

Usage: sinfonia-tier3 [options] TIER1_URL APPLICATION [--] [COMMAND [ARGS...]]
"""

__version__ = "0.1.0.dev0"

__all__ = [
    "Datapath",
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

_WG_CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
_WG_IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
_WG_LABEL_MAC1 = b"mac1----"
_WG_LABEL_COOKIE = b"cookie--"

_REKEY_AFTER_MESSAGES = 1 << 60
_REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
_REKEY_AFTER_TIME = 120.0
_REJECT_AFTER_TIME = 180.0
_REKEY_ATTEMPT_TIME = 90.0
_REKEY_TIMEOUT = 5.0
_REKEY_TIMEOUT_JITTER = 1 / 3
_KEEPALIVE_TIMEOUT = 10.0
_COOKIE_REFRESH_TIME = 120.0
_REPLAY_WINDOW = 8192  # counters, a power of two; the whitepaper asks for >= 2048
_INITIATIONS_PER_SECOND = 50  # per peer, like wireguard-go
_UNDER_LOAD_HANDSHAKES = 64  # handshake messages per second that mean "under load"
_HANDSHAKES_PER_SOURCE, _HANDSHAKE_BURST = 20, 5  # under load, per source host
_QUEUED_PACKETS = 256  # packets kept while waiting for a handshake
_GSO_SEGMENTS = 64  # UDP GSO: at most this many datagrams per send (Linux >= 5.0)
_GSO_BYTES = 65000  # and at most this many bytes

_MSG_INITIATION, _MSG_RESPONSE, _MSG_COOKIE, _MSG_TRANSPORT = 1, 2, 3, 4
_INITIATION_SIZE, _RESPONSE_SIZE, _COOKIE_SIZE = 148, 92, 64
_TRANSPORT_HEADER = 16
_TAG = 16
_KEEPALIVE_SIZE = _TRANSPORT_HEADER + _TAG
_TAI64_BASE = (1 << 62) + 10
_NO_KEY = b"\0" * 32


def _hash(*parts):
    import hashlib

    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def _mac(key, data):
    import hashlib

    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def _kdf(key, data, count):
    """WireGuard's HKDF over HMAC-BLAKE2s: `count` 32-byte outputs."""
    import hmac

    prk = hmac.digest(key, data, "blake2s")
    out, previous = [], b""
    for i in range(1, count + 1):
        previous = hmac.digest(prk, previous + bytes((i,)), "blake2s")
        out.append(previous)
    return out


def _nonce(counter):
    return b"\0\0\0\0" + counter.to_bytes(8, "little")


def _seal(key, counter, plaintext, ad):
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

    return crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _nonce(counter), key)


def _open(key, counter, ciphertext, ad):
    """The plaintext, or None when `ciphertext` does not authenticate."""
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_decrypt
    from nacl.exceptions import CryptoError

    try:
        return crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _nonce(counter), key)
    except CryptoError:
        return None


def _dh(private, public):
    """X25519, or None for a public key of low order (all-zero shared secret)."""
    from nacl.bindings import crypto_scalarmult
    from nacl.exceptions import CryptoError

    try:
        shared = crypto_scalarmult(private, public)
    except CryptoError:  # libsodium refuses low-order points
        return None
    return None if shared == _NO_KEY else shared


def _public_key(private):
    from nacl.bindings import crypto_scalarmult_base

    return crypto_scalarmult_base(private)


def _tai64n(nanoseconds):
    seconds, nanos = divmod(nanoseconds, 1_000_000_000)
    return struct.pack(">QI", _TAI64_BASE + seconds, nanos)


class _Keypair:
    """Transport keys of one completed handshake, with counters and replay window.

    The sending half (send_key, send_counter) is used by one sender only, the
    receiving half by one receiver only, so the two can live in different
    processes. The replay window is a ring indexed by counter modulo its
    size holding the last counter accepted in each place: a counter within
    the window was seen exactly when its place holds it.
    """

    __slots__ = (
        "created",
        "initiator",
        "local_index",
        "receive_key",
        "remote_index",
        "replay_ring",
        "replay_top",
        "send_counter",
        "send_key",
    )

    def __init__(self, send_key, receive_key, local_index, remote_index, created, initiator):
        self.send_key = send_key
        self.receive_key = receive_key
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.initiator = initiator
        self.send_counter = 0
        self.replay_top = -1  # greatest counter accepted so far
        self.replay_ring = [-1] * _REPLAY_WINDOW if receive_key is not None else None


class _Handshake:
    """The initiator's half-done handshake, waiting for the response."""

    __slots__ = ("chain", "ephemeral", "hash", "local_index", "mac1", "started")

    def __init__(self, local_index, ephemeral, chain, hash_, mac1, started):
        self.local_index = local_index
        self.ephemeral = ephemeral
        self.chain = chain
        self.hash = hash_
        self.mac1 = mac1
        self.started = started  # first attempt of this round (REKEY_ATTEMPT_TIME)


class _AllowedIPs:
    """Source-address filter for decrypted packets (the peer's allowed IPs)."""

    def __init__(self, networks):
        import ipaddress

        self.v4, self.v6 = [], []
        for network in networks:
            network = ipaddress.ip_network(network, strict=False)
            mask = int(network.netmask)
            entry = (int(network.network_address) & mask, mask)
            (self.v4 if network.version == 4 else self.v6).append(entry)

    def packet_length(self, buffer, size):
        """Length of the IP packet at the start of `buffer` (`size` bytes were
        decrypted, padding included) when it is well formed and comes from an
        allowed address; 0 when it must be dropped."""
        if size < 20:
            return 0
        version = buffer[0] >> 4
        if version == 4:
            length = (buffer[2] << 8) | buffer[3]
            if length < 20 or length > size:
                return 0
            source = _U32_BE.unpack_from(buffer, 12)[0]
            for network, mask in self.v4:
                if source & mask == network:
                    return length
        elif version == 6 and size >= 40:
            length = 40 + ((buffer[4] << 8) | buffer[5])
            if length > size:
                return 0
            high, low = _U64_PAIR_BE.unpack_from(buffer, 8)
            source = (high << 64) | low
            for network, mask in self.v6:
                if source & mask == network:
                    return length
        return 0


_U32_BE = struct.Struct(">I")
_U64_PAIR_BE = struct.Struct(">QQ")
_U32_LE = struct.Struct("<I")
_U64_LE = struct.Struct("<Q")
_TRANSPORT_HEAD = struct.Struct("<IIQ")  # type, receiver index, counter


class _TransportCipher:
    """ChaCha20-Poly1305 for transport data: `seal(slot, length, key, counter)`
    encrypts in place (the tag follows), `open(slot, offset, size, key,
    counter, out)` decrypts into slot `out` and returns the plaintext length
    or -1. Slots are what `slot(buffer, offset)` returned.

    Fast path: libsodium through pynacl's cffi `lib` straight into the
    buffers (not a public pynacl API, hence guarded). Fallback:
    `nacl.bindings`, plus copies. Both are closures over their state, which
    saves attribute look-ups per packet.
    """

    def __init__(self, fast=True):
        import nacl.bindings  # importing it runs sodium_init(): the fast ChaCha20

        self.fast = False
        if fast:
            try:
                from nacl._sodium import ffi, lib

                self._cffi_closures(ffi, lib)
                self.fast = True
            except (ImportError, AttributeError):
                pass
        if not self.fast:
            self._bindings_closures(nacl.bindings)

    def _cffi_closures(self, ffi, lib):
        encrypt = lib.crypto_aead_chacha20poly1305_ietf_encrypt
        decrypt = lib.crypto_aead_chacha20poly1305_ietf_decrypt
        null, nonce = ffi.NULL, bytearray(12)
        nonce_pointer, pack_nonce = ffi.from_buffer(nonce), _U64_LE.pack_into

        def seal(slot, length, key, counter):
            pack_nonce(nonce, 4, counter)
            encrypt(slot, null, slot, length, null, 0, null, nonce_pointer, key)

        def open_(slot, offset, size, key, counter, out):
            pack_nonce(nonce, 4, counter)
            if size < _TAG or decrypt(out, null, null, slot + offset, size, null, 0,
                                      nonce_pointer, key):
                return -1
            return size - _TAG

        self.seal, self.open = seal, open_
        self.slot = lambda buffer, offset: ffi.from_buffer(memoryview(buffer)[offset:])

    def _bindings_closures(self, bindings):
        from nacl.exceptions import CryptoError

        encrypt = bindings.crypto_aead_chacha20poly1305_ietf_encrypt
        decrypt = bindings.crypto_aead_chacha20poly1305_ietf_decrypt

        def seal(slot, length, key, counter):
            nonce = _nonce(counter)
            slot[:length + _TAG] = encrypt(bytes(slot[:length]), None, nonce, key)

        def open_(slot, offset, size, key, counter, out):
            try:
                out[:size - _TAG] = decrypt(bytes(slot[offset:offset + size]), None,
                                            _nonce(counter), key)
            except CryptoError:  # forged or corrupt
                return -1
            return size - _TAG

        self.seal, self.open = seal, open_
        self.slot = lambda buffer, offset: memoryview(buffer)[offset:]


# Shared counters: written by the process that knows, read by the others.
_TX_BYTES, _RX_BYTES, _LAST_SENT, _LAST_DATA_SENT, _LAST_HANDSHAKE_WALL = range(5)
_COUNTERS = 5


def _shared_counters(area=None):
    """Doubles that forked processes share: the start of `area` (an mmap),
    or of a new anonymous mmap."""
    import mmap

    counters = memoryview(area if area is not None else mmap.mmap(-1, 8 * _COUNTERS))
    counters = counters[:8 * _COUNTERS].cast("d")
    counters[_LAST_SENT] = counters[_LAST_DATA_SENT] = -1e9
    return counters


class _Sender:
    """Encrypts outgoing IP packets: the only user of the send keys and counters.

    Packets are read straight into `slots` (one per packet, room for the
    transport header before and the tag after), sealed in place and handed to
    `emit(views, segment_size, endpoint)` in runs of equal-sized messages,
    which is the shape UDP GSO wants. Without a usable keypair packets wait in
    a short queue and `request_handshake()` asks for one.
    """

    def __init__(self, cipher, counters, emit, request_handshake, *, mtu=1420,
                 clock=None, endpoint=None, headroom=0):
        import time

        self.cipher = cipher
        self.counters = counters
        self.emit = emit
        self.request_handshake = request_handshake
        self.clock = clock or time.monotonic
        self.mtu = mtu
        self.endpoint = endpoint
        self.keypair = None
        self.queue = []
        self.next_request = -1e9
        self.headroom = headroom  # bytes the reader puts before each packet (vnet header)
        capacity = _TRANSPORT_HEADER + ((mtu + 15) & ~15) + _TAG
        self.capacity = capacity
        # As many packets as fit one GSO send when they are all MTU-sized.
        self.batch = batch = min(_GSO_SEGMENTS, _GSO_BYTES // (mtu + _TRANSPORT_HEADER + _TAG))
        self.buffer = bytearray(capacity * batch)
        view = memoryview(self.buffer)
        self.slot_views = [view[i * capacity:(i + 1) * capacity] for i in range(batch)]
        self.read_views = [
            [view[i * capacity + _TRANSPORT_HEADER - headroom:
                  i * capacity + _TRANSPORT_HEADER + mtu]]
            for i in range(batch)
        ]
        self.handles = [cipher.slot(self.buffer, i * capacity + _TRANSPORT_HEADER)
                        for i in range(batch)]
        self.full_size = mtu + _TRANSPORT_HEADER + _TAG  # the message of an MTU-sized packet
        self.full_views = [view[:self.full_size] for view in self.slot_views]

    def install(self, keypair):
        """Use `keypair` from now on (None: forget keys); flush what waited."""
        self.keypair = keypair
        if keypair is None:
            return
        queued, self.queue = self.queue, []
        if queued:
            for packet in queued:
                self.send_packet(packet)
        elif keypair.initiator:
            self.keepalive()  # the responder needs a first packet to confirm

    def set_endpoint(self, endpoint):
        self.endpoint = endpoint

    def drop_queue(self):
        self.queue = []

    def keepalive(self):
        """Send an empty transport message (if there is a keypair to seal it)."""
        self.seal_batch([0], 1)

    def send_packet(self, packet):
        """Encrypt and send one IP packet given as bytes (slow path, tests)."""
        size = len(packet)
        self.slot_views[0][_TRANSPORT_HEADER:_TRANSPORT_HEADER + size] = packet
        self.seal_batch([size], 1)

    def seal_batch(self, sizes, count):
        """Encrypt and send the `count` packets read into the slots."""
        keypair = self.keypair
        now = self.clock()
        if (keypair is None or self.endpoint is None
                or now - keypair.created >= _REJECT_AFTER_TIME
                or keypair.send_counter + count >= _REJECT_AFTER_MESSAGES):
            self._hold(sizes, count, now)
            return
        if keypair.initiator and (now - keypair.created >= _REKEY_AFTER_TIME
                                  or keypair.send_counter >= _REKEY_AFTER_MESSAGES):
            self._ask_for_handshake(now)
        mtu, buffer, handles, seal = self.mtu, self.buffer, self.handles, self.cipher.seal
        key, index, capacity = keypair.send_key, keypair.remote_index, self.capacity
        slot_views, full_views, full_size = self.slot_views, self.full_views, self.full_size
        pack_header, emit, endpoint = _TRANSPORT_HEAD.pack_into, self.emit, self.endpoint
        counter = keypair.send_counter
        views, run, limit, segment, sent, data = [], 0, 0, 0, 0, False
        for i in range(count):
            size = padded = sizes[i]
            if size & 15:
                padded = (size + 15) & ~15
                if padded > mtu:
                    padded = max(mtu, size)
                if padded != size:
                    start = i * capacity + _TRANSPORT_HEADER
                    buffer[start + size:start + padded] = bytes(padded - size)
            if size:
                data = True
            pack_header(buffer, i * capacity, _MSG_TRANSPORT, index, counter)
            seal(handles[i], padded, key, counter)
            counter += 1
            message = padded + _TRANSPORT_HEADER + _TAG
            sent += message
            if run and (message > segment or run == limit):
                emit(views, segment, endpoint)
                views, run = [], 0
            if not run:
                segment, limit = message, min(_GSO_SEGMENTS, _GSO_BYTES // message)
            views.append(full_views[i] if message == full_size else slot_views[i][:message])
            run += 1
            if message < segment:  # a shorter message ends a GSO run
                emit(views, segment, endpoint)
                views, run = [], 0
        if run:
            emit(views, segment, endpoint)
        keypair.send_counter = counter
        counters = self.counters
        counters[_TX_BYTES] += sent
        counters[_LAST_SENT] = now
        if data:
            counters[_LAST_DATA_SENT] = now

    def _hold(self, sizes, count, now):
        for i in range(count):
            if sizes[i] and len(self.queue) < _QUEUED_PACKETS:
                start = _TRANSPORT_HEADER
                self.queue.append(bytes(self.slot_views[i][start:start + sizes[i]]))
        if count:  # data or a keepalive that no usable keypair can carry
            self._ask_for_handshake(now)

    def _ask_for_handshake(self, now):
        if now >= self.next_request:
            self.next_request = now + 1.0
            self.request_handshake()


class _Peer:
    """The WireGuard protocol for one peer: handshakes, cookies, keypairs, timers.

    Pure state, no I/O: `clock` is injectable and every output goes through
    the hooks, so tests drive two instances against each other in one process.
    Hooks (set by the owner): `transmit(datagram, address)` sends a handshake
    or cookie message; `sender` is the object encrypting outgoing data
    (`install(keypair)`, `set_endpoint(address)`, `keepalive()`,
    `drop_queue()`): a `_Sender`, or its proxy in another process.
    """

    def __init__(self, private_key, peer_public_key, *, preshared_key=None,
                 allowed_ips=(), persistent_keepalive=0, endpoint=None,
                 clock=None, wallclock_ns=None, random=os.urandom, cipher=None,
                 counters=None):
        import time

        if len(private_key) != 32 or len(peer_public_key) != 32:
            raise TunnelError("WireGuard keys must be 32 bytes")
        if preshared_key is not None and len(preshared_key) != 32:
            raise TunnelError("the WireGuard preshared key must be 32 bytes")
        self.private_key = bytes(private_key)
        self.public_key = _public_key(self.private_key)
        self.peer_public_key = bytes(peer_public_key)
        self.preshared_key = bytes(preshared_key) if preshared_key else _NO_KEY
        self.static_secret = _dh(self.private_key, self.peer_public_key)
        if self.static_secret is None:
            raise TunnelError("the peer's WireGuard public key is invalid")
        self.allowed = _AllowedIPs(allowed_ips)
        self.persistent_keepalive = persistent_keepalive
        self.endpoint = endpoint
        self.clock = clock or time.monotonic
        self.wallclock_ns = wallclock_ns or time.time_ns
        self.random = random
        self.transmit = None
        self.sender = None
        chain = _hash(_WG_CONSTRUCTION)
        self.initial_chain = chain
        self.initiation_hash = _hash(_hash(chain, _WG_IDENTIFIER), self.peer_public_key)
        self.responder_hash = _hash(_hash(chain, _WG_IDENTIFIER), self.public_key)
        self.mac1_key_out = _hash(_WG_LABEL_MAC1, self.peer_public_key)
        self.mac1_key_in = _hash(_WG_LABEL_MAC1, self.public_key)
        self.cookie_key_out = _hash(_WG_LABEL_COOKIE, self.peer_public_key)
        self.cookie_key_in = _hash(_WG_LABEL_COOKIE, self.public_key)
        # handshake and keypairs
        self.handshake = None
        self.current = self.previous = self.next = None
        self.keypairs = {}  # local index -> _Keypair, for the receiving path
        self.last_timestamp = b""
        self.stamp_sent_ns = 0
        self.last_initiation_consumed = -1e9
        self.last_initiation_sent = -1e9
        self.retransmit_at = None
        self.last_response_mac1 = None  # (local index, mac1) of our last response
        # cookies
        self.cookie = None
        self.cookie_received = -1e9
        self.cookie_secret = random(32)
        self.cookie_secret_born = self.clock()
        self.load_window_start = -1e9
        self.load_count = 0
        self.under_load_until = -1e9
        self.rate_buckets = {}  # source host -> (tokens, time), used under load
        # timer inputs (what was sent is in `counters`: the sender writes it)
        self.last_handshake = None  # monotonic time of the last completed handshake
        self.last_received = -1e9
        self.last_data_received = -1e9
        self.unanswered_data = -1e9
        self.counters = counters if counters is not None else _shared_counters()
        self.cipher = cipher or _TransportCipher()
        self.inbox = bytearray(65536)  # datagrams as received (with GRO, several)
        self.inbox_handle = self.cipher.slot(self.inbox, 0)
        self.plain = bytearray(65536)  # one decrypted packet
        self.plain_handle = self.cipher.slot(self.plain, 0)

    # -- handshake initiation -------------------------------------------------

    def initiate(self, now=None, retry=False):
        """Send a handshake initiation unless one went out within REKEY_TIMEOUT."""
        now = self.clock() if now is None else now
        if self.endpoint is None or (self.handshake is not None and not retry):
            return
        if not retry and now - self.last_initiation_sent < _REKEY_TIMEOUT:
            return
        ephemeral = self.random(32)
        ephemeral_public = _public_key(ephemeral)
        shared = _dh(ephemeral, self.peer_public_key)
        chain = _kdf(self.initial_chain, ephemeral_public, 1)[0]
        hash_ = _hash(self.initiation_hash, ephemeral_public)
        chain, key = _kdf(chain, shared, 2)
        static = _seal(key, 0, self.public_key, hash_)
        hash_ = _hash(hash_, static)
        chain, key = _kdf(chain, self.static_secret, 2)
        self.stamp_sent_ns = max(self.wallclock_ns(), self.stamp_sent_ns + 1)
        timestamp = _seal(key, 0, _tai64n(self.stamp_sent_ns), hash_)
        hash_ = _hash(hash_, timestamp)
        started = self.handshake.started if retry and self.handshake else now
        self._forget_handshake()
        index = self._new_index()
        message = struct.pack("<II", _MSG_INITIATION, index) + ephemeral_public + static + timestamp
        message, mac1 = self._add_macs(message, now)
        self.handshake = _Handshake(index, ephemeral, chain, hash_, mac1, started)
        self.keypairs[index] = None  # reserved until the response or the next attempt
        self.last_initiation_sent = now
        jitter = _REKEY_TIMEOUT_JITTER * self.random(1)[0] / 255
        self.retransmit_at = now + _REKEY_TIMEOUT + jitter
        self._transmit(message, now)

    # -- receiving ------------------------------------------------------------

    def receive(self, size, segment, address, now, deliver):
        """Handle `size` bytes that arrived in `self.inbox` from `address`: one
        datagram, or with UDP GRO several of `segment` bytes (the last may be
        shorter). Each IP packet that authenticates, is not a replay and comes
        from an allowed address is left at the start of `self.plain` and
        `deliver(length)` is called; everything else is dropped silently.
        """
        inbox, keypairs, unpack = self.inbox, self.keypairs, _TRANSPORT_HEAD.unpack_from
        open_, inbox_handle, plain_handle = self.cipher.open, self.inbox_handle, self.plain_handle
        packet_length, plain = self.allowed.packet_length, self.plain
        ring_mask, window, too_many = _REPLAY_WINDOW - 1, _REPLAY_WINDOW, _REJECT_AFTER_MESSAGES
        received = data = 0
        keypair = None
        for start in range(0, size, segment):
            end = min(start + segment, size)
            if end - start < _KEEPALIVE_SIZE:
                continue
            kind, index, counter = unpack(inbox, start)
            if kind != _MSG_TRANSPORT:
                if kind in (_MSG_INITIATION, _MSG_RESPONSE, _MSG_COOKIE):
                    self._receive_handshake(bytes(inbox[start:end]), address, now)
                    keypair = None  # keypairs may have changed
                continue
            if keypair is None or index != keypair.local_index:
                keypair = keypairs.get(index)
                if keypair is None or now - keypair.created >= _REJECT_AFTER_TIME:
                    keypair = None
                    continue
                key, ring, unconfirmed = keypair.receive_key, keypair.replay_ring, keypair is self.next
            place = counter & ring_mask
            if ring[place] == counter or keypair.replay_top - counter >= window or counter >= too_many:
                continue  # replayed, too old, or past the limit
            length = open_(inbox_handle, start + _TRANSPORT_HEADER, end - start - _TRANSPORT_HEADER,
                           key, counter, plain_handle)
            if length < 0:
                continue
            ring[place] = counter
            keypair.replay_top = max(keypair.replay_top, counter)
            received += end - start
            if unconfirmed:
                unconfirmed = False
                self._confirm_next(now)
            if length:
                data = True
                length = packet_length(plain, length)
                if length:
                    deliver(length)
        if received:
            self.counters[_RX_BYTES] += received
            self.last_received = now
            if address != self.endpoint:
                self._roam(address)
            current = self.current
            if data:
                self.last_data_received = now
                if (current is not None and current.initiator and now - current.created
                        >= _REJECT_AFTER_TIME - _KEEPALIVE_TIMEOUT - _REKEY_TIMEOUT):
                    self.initiate(now)

    def receive_datagram(self, datagram, address, now, deliver):
        """`receive` for one datagram given as bytes (tests, slow paths)."""
        size = min(len(datagram), len(self.inbox))
        self.inbox[:size] = datagram[:size]
        self.receive(size, size or 1, address, now, deliver)

    def _receive_handshake(self, message, address, now):
        kind, size = message[0], len(message)
        if kind == _MSG_INITIATION and size == _INITIATION_SIZE:
            if self._macs_pass(message, address, now):
                self._consume_initiation(message, address, now)
        elif kind == _MSG_RESPONSE and size == _RESPONSE_SIZE:
            if self._macs_pass(message, address, now):
                self._consume_response(message, address, now)
        elif kind == _MSG_COOKIE and size == _COOKIE_SIZE:
            self._consume_cookie(message, now)

    def _consume_initiation(self, message, address, now):
        """Responder: check an initiation, answer it, keep the keypair as `next`."""
        import hmac

        ephemeral = message[8:40]
        chain = _kdf(self.initial_chain, ephemeral, 1)[0]
        hash_ = _hash(self.responder_hash, ephemeral)
        shared = _dh(self.private_key, ephemeral)
        if shared is None:
            return
        chain, key = _kdf(chain, shared, 2)
        static = _open(key, 0, message[40:88], hash_)
        if static is None or not hmac.compare_digest(static, self.peer_public_key):
            return
        hash_ = _hash(hash_, message[40:88])
        chain, key = _kdf(chain, self.static_secret, 2)
        stamp = _open(key, 0, message[88:116], hash_)
        if stamp is None or stamp <= self.last_timestamp:
            return  # replayed or older than one already accepted
        if now - self.last_initiation_consumed < 1 / _INITIATIONS_PER_SECOND:
            return
        hash_ = _hash(hash_, message[88:116])
        ephemeral_private = self.random(32)
        ephemeral_public = _public_key(ephemeral_private)
        first = _dh(ephemeral_private, ephemeral)
        second = _dh(ephemeral_private, self.peer_public_key)
        if first is None or second is None:
            return
        self.last_timestamp = stamp
        self.last_initiation_consumed = now
        chain = _kdf(chain, ephemeral_public, 1)[0]
        hash_ = _hash(hash_, ephemeral_public)
        chain = _kdf(chain, first, 1)[0]
        chain = _kdf(chain, second, 1)[0]
        chain, tau, key = _kdf(chain, self.preshared_key, 3)
        hash_ = _hash(hash_, tau)
        empty = _seal(key, 0, b"", hash_)
        remote_index = _U32_LE.unpack_from(message, 4)[0]
        index = self._new_index()
        response = struct.pack("<III", _MSG_RESPONSE, index, remote_index) + ephemeral_public + empty
        response, mac1 = self._add_macs(response, now)
        receive_key, send_key = _kdf(chain, b"", 2)
        if self.next is not None:
            self.keypairs.pop(self.next.local_index, None)
        self.next = _Keypair(send_key, receive_key, index, remote_index, now, False)
        self.keypairs[index] = self.next
        self.last_response_mac1 = (index, mac1)
        self.last_received = now
        self._roam(address)
        self._transmit(response, now)

    def _consume_response(self, message, address, now):
        """Initiator: finish the handshake; the new keypair is used at once."""
        sender_index, receiver_index = struct.unpack_from("<II", message, 4)
        handshake = self.handshake
        if handshake is None or receiver_index != handshake.local_index:
            return
        ephemeral = message[12:44]
        first = _dh(handshake.ephemeral, ephemeral)
        second = _dh(self.private_key, ephemeral)
        if first is None or second is None:
            return
        chain = _kdf(handshake.chain, ephemeral, 1)[0]
        hash_ = _hash(handshake.hash, ephemeral)
        chain = _kdf(chain, first, 1)[0]
        chain = _kdf(chain, second, 1)[0]
        chain, tau, key = _kdf(chain, self.preshared_key, 3)
        hash_ = _hash(hash_, tau)
        if _open(key, 0, message[44:60], hash_) != b"":
            return
        send_key, receive_key = _kdf(chain, b"", 2)
        keypair = _Keypair(send_key, receive_key, handshake.local_index, sender_index, now, True)
        self.handshake = None
        self.retransmit_at = None
        for old in (self.previous, self.next):
            if old is not None:
                self.keypairs.pop(old.local_index, None)
        self.previous, self.current, self.next = self.current, keypair, None
        self.keypairs[keypair.local_index] = keypair
        self.last_received = now
        self._roam(address)
        self._handshake_complete(now)

    def _confirm_next(self, now):
        """Responder: the initiator used the new keypair, so it becomes current."""
        if self.previous is not None:
            self.keypairs.pop(self.previous.local_index, None)
        self.previous, self.current, self.next = self.current, self.next, None
        self._handshake_complete(now)

    def _handshake_complete(self, now):
        self.last_handshake = now
        self.counters[_LAST_HANDSHAKE_WALL] = self.wallclock_ns() / 1e9
        self.sender.install(self.current)

    def _consume_cookie(self, message, now):
        """Initiator (or responder): remember the cookie for mac2 of later messages."""
        from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt
        from nacl.exceptions import CryptoError

        index = _U32_LE.unpack_from(message, 4)[0]
        if self.handshake is not None and index == self.handshake.local_index:
            mac1 = self.handshake.mac1
        elif self.last_response_mac1 is not None and index == self.last_response_mac1[0]:
            mac1 = self.last_response_mac1[1]
        else:
            return
        try:
            cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
                message[32:64], mac1, message[8:32], self.cookie_key_out)
        except CryptoError:  # not from our peer
            return
        self.cookie, self.cookie_received = cookie, now

    # -- mac1, mac2 and cookies ---------------------------------------------

    def _add_macs(self, message, now):
        """`message` with mac1 and mac2 appended, and the mac1."""
        mac1 = _mac(self.mac1_key_out, message)
        message += mac1
        if self.cookie is not None and now - self.cookie_received < _COOKIE_REFRESH_TIME:
            return message + _mac(self.cookie, message), mac1
        return message + bytes(16), mac1

    def _macs_pass(self, message, address, now):
        """Whether a handshake message may be processed: mac1 must be right, and
        when under load mac2 too; otherwise under load a cookie reply goes back."""
        import hmac

        if not hmac.compare_digest(message[-32:-16], _mac(self.mac1_key_in, message[:-32])):
            return False
        if now - self.load_window_start >= 1.0:
            self.load_window_start, self.load_count = now, 0
        self.load_count += 1
        if self.load_count > _UNDER_LOAD_HANDSHAKES:
            self.under_load_until = now + 1.0
        if now >= self.under_load_until:
            return True
        if now - self.cookie_secret_born >= _COOKIE_REFRESH_TIME:
            self.cookie_secret, self.cookie_secret_born = self.random(32), now
        cookie = _mac(self.cookie_secret, repr(address[:2]).encode())
        if hmac.compare_digest(message[-16:], _mac(cookie, message[:-16])):
            return self._within_rate(address[0], now)
        from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

        nonce = self.random(24)
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(
            cookie, message[-32:-16], nonce, self.cookie_key_in)
        reply = _U32_LE.pack(_MSG_COOKIE) + message[4:8] + nonce + sealed
        self.transmit(reply, address)
        return False

    def _within_rate(self, host, now):
        """Under load, even sources that proved their address get at most
        _HANDSHAKES_PER_SOURCE handshake messages a second (a token bucket)."""
        tokens, last = self.rate_buckets.get(host, (_HANDSHAKE_BURST, now))
        tokens = min(_HANDSHAKE_BURST, tokens + (now - last) * _HANDSHAKES_PER_SOURCE)
        if len(self.rate_buckets) >= 4096:
            self.rate_buckets.clear()  # bounded memory; a flood only resets buckets
        if tokens < 1:
            self.rate_buckets[host] = (tokens, now)
            return False
        self.rate_buckets[host] = (tokens - 1, now)
        return True

    # -- timers ---------------------------------------------------------------

    def tick(self, now=None):
        """Run the timer state machine; call it a few times a second."""
        now = self.clock() if now is None else now
        counters = self.counters
        last_sent, last_data_sent = counters[_LAST_SENT], counters[_LAST_DATA_SENT]
        handshake = self.handshake
        if handshake is not None and now >= self.retransmit_at:
            if now - handshake.started >= _REKEY_ATTEMPT_TIME:
                self._forget_handshake()
                self.retransmit_at = None
                self.sender.drop_queue()  # what waited for this handshake is stale
            else:
                self.initiate(now, retry=True)
        if self.last_handshake is not None and now - self.last_handshake >= 3 * _REJECT_AFTER_TIME:
            self._forget_keypairs()
        if self.current is not None:
            passive = (self.last_data_received > last_sent
                       and now - self.last_data_received >= _KEEPALIVE_TIMEOUT)
            persistent = (self.persistent_keepalive and now - max(last_sent, self.last_received)
                          >= self.persistent_keepalive)
            if passive or persistent:
                self._keepalive(now)
        elif (self.persistent_keepalive and self.handshake is None
              and now - max(last_sent, self.last_received) >= self.persistent_keepalive):
            self.initiate(now)
        if (last_data_sent > self.last_received and last_data_sent > self.unanswered_data
                and now - last_data_sent >= _KEEPALIVE_TIMEOUT + _REKEY_TIMEOUT):
            self.unanswered_data = last_data_sent
            self.initiate(now)

    def _keepalive(self, now):
        self.counters[_LAST_SENT] = now  # the sender confirms it when it sends
        self.sender.keepalive()

    # -- bookkeeping ------------------------------------------------------------

    def _transmit(self, message, now):
        self.counters[_LAST_SENT] = now
        self.transmit(message, self.endpoint)

    def _roam(self, address):
        """The peer authenticated from `address`: send there from now on."""
        if address != self.endpoint:
            self.endpoint = address
            self.sender.set_endpoint(address)

    def _new_index(self):
        while True:
            index = _U32_LE.unpack(self.random(4))[0]
            if index not in self.keypairs:
                return index

    def _forget_handshake(self):
        if self.handshake is not None:
            if self.keypairs.get(self.handshake.local_index, 0) is None:
                del self.keypairs[self.handshake.local_index]
            self.handshake = None

    def _forget_keypairs(self):
        self.current = self.previous = self.next = None
        self.keypairs = {index: None for index, kp in self.keypairs.items() if kp is None}
        self.last_handshake = None
        self.sender.install(None)


# Datapath event loop #########################################################

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUNSETOFFLOAD = 0x400454D0


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


_SOL_UDP = 17
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33  # beyond the sysctl limits, when privileged
_UDP_SEGMENT = 103
_UDP_GRO = 104
_VNET_HEADER = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_VNET_HEADER_SIZE = _VNET_HEADER.size
_VNET_NEEDS_CSUM = 1
_VNET_GSO_TCPV4, _VNET_GSO_TCPV6 = 1, 4
_TCP_ACK, _TCP_PSH = 0x10, 0x08
_U16_BE = struct.Struct(">H")
_COALESCE_LIMIT = 65535 - 1500  # bytes in one GSO packet written to the TUN


class _TunWriter:
    """Writes decrypted packets (left in `plain` by `_Peer.receive`) to the TUN.

    With a virtio_net_hdr on the device, consecutive segments of one TCP flow
    are coalesced into one GSO packet: one write instead of dozens.
    """

    __slots__ = (
        "buffer",
        "fd",
        "header_size",
        "ip_size",
        "key",
        "layout",
        "layouts",
        "next_seq",
        "plain",
        "plain_view",
        "segment",
        "segments",
        "seq_at",
        "single_header",
        "size",
        "view",
        "vnet_hdr",
    )

    def __init__(self, tun_fd, plain, vnet_hdr):
        self.fd = tun_fd
        self.plain = plain
        self.plain_view = memoryview(plain)
        self.vnet_hdr = vnet_hdr
        self.single_header = bytes(_VNET_HEADER_SIZE)
        self.buffer = bytearray(_VNET_HEADER_SIZE + 65536)
        self.view = memoryview(self.buffer)
        self.size = 0  # bytes of the IP packet being coalesced (0: none)
        self.key = None
        self.next_seq = 0
        self.segment = 0
        self.segments = 0
        self.header_size = self.ip_size = self.seq_at = 0
        self.layout = None
        self.layouts = {}  # header size (negative: IPv6) -> _flow_layout

    def write(self, length):
        """Queue (or write) the IP packet of `length` bytes at the start of `plain`."""
        size = self.size
        if size and length > self.header_size:  # the common case: the flow goes on
            fields = self.layout.unpack_from(self.plain)
            payload = length - self.header_size
            if (fields[::2] == self.key and fields[self.seq_at] == self.next_seq
                    and fields[self.seq_at + 2] & ~_TCP_PSH == _TCP_ACK
                    and payload <= self.segment and size + payload <= _COALESCE_LIMIT):
                start = _VNET_HEADER_SIZE + size
                self.buffer[start:start + payload] = self.plain_view[self.header_size:length]
                self.size = size + payload
                self.segments += 1
                self.next_seq = (self.next_seq + payload) & 0xFFFFFFFF
                flags = fields[self.seq_at + 2]
                if flags & _TCP_PSH or payload < self.segment:  # the end of a burst
                    self.buffer[_VNET_HEADER_SIZE + self.ip_size + 13] |= flags
                    self.flush()
                return
        self.flush()
        if not (self.vnet_hdr and self._start_flow(length)):
            self._write_single(length)

    def _start_flow(self, length):
        """Begin coalescing with this packet if it is a plain TCP segment with
        data; False when it must go out alone."""
        plain = self.plain
        first = plain[0]
        if first == 0x45 and plain[9] == 6 and not (plain[6] & 0x3F or plain[7]):
            ip_size = 20
        elif first >> 4 == 6 and plain[6] == 6:
            ip_size = 40
        else:
            return False
        if length < ip_size + 20:
            return False
        header_size = ip_size + (plain[ip_size + 12] >> 4) * 4
        payload = length - header_size
        if payload <= 0 or plain[ip_size + 13] != _TCP_ACK:
            return False
        shape = header_size if ip_size == 20 else -header_size
        layout = self.layouts.get(shape)
        if layout is None:
            layout = self.layouts[shape] = _flow_layout(ip_size, header_size)
        fields = layout.unpack_from(plain)
        self.buffer[_VNET_HEADER_SIZE:_VNET_HEADER_SIZE + length] = self.plain_view[:length]
        self.size, self.key, self.segment, self.segments = length, fields[::2], payload, 1
        self.layout, self.seq_at = layout, 5 if ip_size == 20 else 3
        self.next_seq = (fields[self.seq_at] + payload) & 0xFFFFFFFF
        self.header_size, self.ip_size = header_size, ip_size
        return True

    def flush(self):
        """Write the packet being coalesced, as one GSO packet if it grew."""
        size = self.size
        if not size:
            return
        self.size = 0
        buffer, ip = self.buffer, _VNET_HEADER_SIZE
        if self.segments == 1:
            buffer[:ip] = self.single_header
            self._write(self.view[:ip + size])
            return
        ip_size = self.ip_size
        tcp_size = size - ip_size
        if ip_size == 20:
            _U16_BE.pack_into(buffer, ip + 2, size)
            _U16_BE.pack_into(buffer, ip + 10, 0)
            _U16_BE.pack_into(buffer, ip + 10, 0xFFFF ^ _fold(sum(struct.unpack_from(">10H", buffer, ip))))
            pseudo = sum(struct.unpack_from(">4H", buffer, ip + 12)) + 6 + tcp_size
            gso_type = _VNET_GSO_TCPV4
        else:
            _U16_BE.pack_into(buffer, ip + 4, tcp_size)
            pseudo = sum(struct.unpack_from(">16H", buffer, ip + 8)) + 6 + tcp_size
            gso_type = _VNET_GSO_TCPV6
        _U16_BE.pack_into(buffer, ip + ip_size + 16, _fold(pseudo))
        _VNET_HEADER.pack_into(buffer, 0, _VNET_NEEDS_CSUM, gso_type, self.header_size,
                               self.segment, ip_size, 16)
        self._write(self.view[:ip + size])

    def _write_single(self, length):
        if self.vnet_hdr:
            try:
                os.writev(self.fd, (self.single_header, self.plain_view[:length]))
            except OSError:
                pass  # like a full queue on a NIC: the packet is lost
        else:
            self._write(self.plain_view[:length])

    def _write(self, data):
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # like a full queue on a NIC: the packet is lost


def _flow_layout(ip_size, header_size):
    """A Struct whose even fields are what must match for two TCP segments of
    one flow to be coalesced: everything in the headers except lengths, IPv4
    id, checksums, sequence number and PSH (odd fields are skipped values)."""
    options = header_size - ip_size - 20
    if ip_size == 20:
        return struct.Struct(f">2s4s4s2s12sI5sB2s2s{options + 2}s")
    return struct.Struct(f">4s2s38sI5sB2s2s{options + 2}s")


def _fold(total):
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class _SenderLink:
    """The control process's handle on the `_Sender` in the sending process."""

    def __init__(self, sock, endpoint_area):
        self.sock = sock
        self.endpoint_area = endpoint_area

    def install(self, keypair):
        if keypair is not None:
            keypair = (keypair.send_key, keypair.local_index, keypair.remote_index,
                       keypair.created, keypair.initiator)
        self._send(("install", keypair))

    def set_endpoint(self, endpoint):
        _store_endpoint(self.endpoint_area, endpoint)
        self._send(("endpoint", endpoint))

    def keepalive(self):
        self._send(("keepalive",))

    def drop_queue(self):
        self._send(("drop_queue",))

    def _send(self, message):
        import pickle

        self.sock.send(pickle.dumps(message))


def _store_endpoint(area, endpoint):
    """Put `endpoint` where `_load_endpoint` in any of our processes finds it."""
    text = f"{endpoint[0]} {endpoint[1]}".encode() if endpoint else b""
    area[1:1 + len(text)] = text
    area[0] = len(text)


def _load_endpoint(area):
    """(host, port) of the peer as last stored (IPv4 without the ::ffff: prefix)."""
    text = bytes(area[1:1 + area[0]]).decode()
    if not text:
        return None
    host, port = text.rsplit(" ", 1)
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, int(port)


def _udp_emitter(sock, gso):
    """An `emit` for `_Sender`: one sendmsg per run of messages with UDP GSO."""
    import errno

    segment_option = struct.Struct("=H")
    state = {"gso": gso}

    def emit(views, segment, endpoint):
        try:
            if state["gso"] and len(views) > 1:
                try:
                    sock.sendmsg(views, [(_SOL_UDP, _UDP_SEGMENT, segment_option.pack(segment))],
                                 0, endpoint)
                    return
                except OSError as e:
                    if e.errno not in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
                        return
                    state["gso"] = False  # the kernel or device cannot: one by one
            for view in views:
                sock.sendto(view, endpoint)
        except OSError:
            pass  # unreachable or full: like any lost datagram

    return emit


def _receive_loop(peer, sock, tun_fd, link, parent_pid, vnet_hdr, gro):
    """The control and decrypting process: UDP -> TUN, handshakes, timers.
    Returns when the parent or the sending process is gone."""
    import select
    import socket

    poller = select.poll()
    sock_fd, link_fd = sock.fileno(), link.fileno()
    for fd in (sock_fd, link_fd):
        poller.register(fd, select.POLLIN)
    writer = _TunWriter(tun_fd, peer.plain, vnet_hdr)
    write, flush, receive, clock = writer.write, writer.flush, peer.receive, peer.clock
    recvmsg_into, inbox = sock.recvmsg_into, (peer.inbox,)
    ancillary = socket.CMSG_SPACE(4) if gro else 0
    dontwait = socket.MSG_DONTWAIT
    peer.initiate()
    next_tick = 0.0
    while True:
        for fd, _ in poller.poll(100):
            if fd == sock_fd:
                now = clock()
                for _ in range(256):  # bounded, so that timers keep running
                    try:
                        size, cmsgs, _, address = recvmsg_into(inbox, ancillary, dontwait)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue  # e.g. ICMP errors reported on the socket
                    segment = size
                    if cmsgs:
                        level, kind, data = cmsgs[0]
                        if level == _SOL_UDP and kind == _UDP_GRO:
                            segment = int.from_bytes(data[:4], sys.byteorder) or size
                    if size:
                        receive(size, segment, address, now, write)
                flush()
            elif fd == link_fd:
                try:
                    message = link.recv(4096, dontwait)
                except BlockingIOError:
                    continue
                if not message:
                    return
                peer.initiate()  # the sender only ever asks for a handshake
        now = clock()
        if now >= next_tick:
            if os.getppid() != parent_pid:
                return
            next_tick = now + 0.1
            peer.tick(now)


def _send_loop(sender, tun_fd, link, parent_pid, vnet_hdr):
    """The encrypting process: TUN -> UDP. Returns when the parent or the
    receiving process is gone."""
    import pickle
    import select
    import socket

    poller = select.poll()
    link_fd = link.fileno()
    for fd in (tun_fd, link_fd):
        poller.register(fd, select.POLLIN)
    batch = sender.batch
    sizes = [0] * batch
    read_views = sender.read_views
    readv, seal_batch = os.readv, sender.seal_batch
    headroom = _VNET_HEADER_SIZE if vnet_hdr else 0
    while True:
        events = poller.poll(1000)
        if not events and os.getppid() != parent_pid:
            return
        for fd, _ in events:
            if fd == tun_fd:
                count = batch
                while count == batch:
                    count = 0
                    while count < batch:
                        try:
                            size = readv(tun_fd, read_views[count]) - headroom
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            return  # the TUN device is gone: so is the session
                        if size > 0:
                            sizes[count] = size
                            count += 1
                    if count:
                        seal_batch(sizes, count)
            elif fd == link_fd:
                try:
                    message = link.recv(4096, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                if not message:
                    return
                message = pickle.loads(message)
                if message[0] == "install":
                    keypair = message[1]
                    if keypair is not None:
                        send_key, local_index, remote_index, created, initiator = keypair
                        keypair = _Keypair(send_key, None, local_index, remote_index,
                                           created, initiator)
                    sender.install(keypair)
                elif message[0] == "endpoint":
                    sender.set_endpoint(message[1])
                elif message[0] == "keepalive":
                    sender.keepalive()
                elif message[0] == "drop_queue":
                    sender.drop_queue()


class Datapath:
    """Userspace WireGuard between a TUN file descriptor and a UDP socket.

    One peer. The socket is bound at construction (`listen_port`); `listen`
    is (host, port), by default the wildcard of the endpoint's family, or
    dual-stack IPv6 without an endpoint. `endpoint` is (host, port), host a
    name or an IPv4 or IPv6 literal; without one this side waits for the
    peer (responder). `mtu` is the TUN device's. `start()` forks two worker
    processes that share the keys: one encrypts TUN -> UDP, the other
    decrypts UDP -> TUN and runs handshakes and timers; this object only
    watches them through shared memory (`wait_for_handshake`, `stats`) and
    ends them (`stop`). One start per object.
    """

    def __init__(self, tun_fd, private_key, peer_public_key, *, endpoint=None,
                 allowed_ips=(), preshared_key=None, persistent_keepalive=0,
                 listen=None, vnet_hdr=False, mtu=1420, clock=None):
        import mmap
        import time

        self._clock = clock or time.monotonic
        self._tun_fd = tun_fd
        self._vnet_hdr = vnet_hdr
        os.set_blocking(tun_fd, False)  # the sender drains it until EAGAIN
        if vnet_hdr:
            # Offloads off: the kernel hands us MTU-sized packets, whose
            # encryption needs no splitting in Python (splitting costs more
            # than the offload saves); writes may still carry GSO packets.
            try:
                fcntl.ioctl(tun_fd, _TUNSETOFFLOAD, 0)
            except OSError as e:
                raise TunnelError(f"cannot configure the TUN device: {e.strerror}") from None
        self._mtu = mtu
        self._shared = mmap.mmap(-1, 8 * _COUNTERS + 256)
        self._counters = _shared_counters(self._shared)
        self._endpoint_area = memoryview(self._shared)[8 * _COUNTERS:]
        self._peer = _Peer(private_key, peer_public_key, preshared_key=preshared_key,
                           allowed_ips=allowed_ips, persistent_keepalive=persistent_keepalive,
                           clock=self._clock, counters=self._counters)
        self._socket = sock = _udp_socket(listen, endpoint)
        self.listen_port = sock.getsockname()[1]
        try:
            self._endpoint = _resolve_endpoint(sock, endpoint) if endpoint else None
        except TunnelError:
            sock.close()
            raise
        self._peer.endpoint = self._endpoint
        _store_endpoint(self._endpoint_area, self._endpoint)
        self._gso = _try_setsockopt(sock, _SOL_UDP, _UDP_SEGMENT, 0)
        self._gro = _try_setsockopt(sock, _SOL_UDP, _UDP_GRO, 1)
        self._workers = []

    def start(self):
        """Fork the two workers; with an endpoint the handshake starts at once."""
        import socket

        if self._workers:
            return
        control, data = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peer, sock = self._peer, self._socket
        sender = _Sender(peer.cipher, self._counters, _udp_emitter(sock, self._gso),
                         lambda: data.send(b"handshake"), mtu=self._mtu, clock=self._clock,
                         endpoint=self._endpoint,
                         headroom=_VNET_HEADER_SIZE if self._vnet_hdr else 0)
        peer.transmit = lambda message, address: _send_quietly(sock, message, address)
        peer.sender = _SenderLink(control, self._endpoint_area)
        parent = os.getpid()
        tun_fd = self._tun_fd
        self._workers.append(_fork_worker(
            (tun_fd, sock.fileno(), data.fileno()),
            _send_loop, sender, tun_fd, data, parent, self._vnet_hdr))
        self._workers.append(_fork_worker(
            (tun_fd, sock.fileno(), control.fileno()),
            _receive_loop, peer, sock, tun_fd, control, parent, self._vnet_hdr, self._gro))
        control.close()
        data.close()

    def wait_for_handshake(self, timeout):
        """Return once a handshake has completed; TunnelError after `timeout` s."""
        import time

        deadline = time.monotonic() + timeout
        while not self._counters[_LAST_HANDSHAKE_WALL]:
            if not self._workers or not self._running():
                raise TunnelError("the WireGuard datapath is not running")
            if time.monotonic() >= deadline:
                raise TunnelError(f"no WireGuard handshake with the peer within {timeout:g} s")
            time.sleep(0.01)

    def _running(self):
        """Whether both workers are alive (one that ended is reaped)."""
        for pid in list(self._workers):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    self._workers.remove(pid)
            except ChildProcessError:
                self._workers.remove(pid)
        return len(self._workers) == 2

    def stats(self):
        """Last handshake (epoch seconds or None), bytes both ways, peer endpoint."""
        counters = self._counters
        return {
            "last_handshake": counters[_LAST_HANDSHAKE_WALL] or None,
            "rx_bytes": int(counters[_RX_BYTES]),
            "tx_bytes": int(counters[_TX_BYTES]),
            "endpoint": _load_endpoint(self._endpoint_area),
        }

    def stop(self):
        """End the workers and close the socket; safe to call more than once."""
        import signal
        import time

        self._running()  # reap what already ended
        for pid in self._workers:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while self._workers and time.monotonic() < deadline:
            self._running()
            time.sleep(0.005)
        for pid in self._workers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self._workers = []
        self._socket.close()


def _fork_worker(keep_fds, function, *args):
    """Run `function(*args)` in a child process, which never returns to the
    caller. The child keeps only `keep_fds` and stdio: it must not hold
    pipes or sockets of the caller open past the caller's own use of them."""
    import signal

    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        for fd in os.listdir("/proc/self/fd"):
            if int(fd) > 2 and int(fd) not in keep_fds:
                try:
                    os.close(int(fd))
                except OSError:
                    pass  # the directory's own descriptor, already closed
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the session ends us, not Ctrl-C
        signal.signal(signal.SIGTERM, _leave)
        function(*args)
        status = 0
    except SystemExit:
        status = 0
    except BaseException:  # noqa: BLE001 - a worker must never return into the caller
        import traceback

        traceback.print_exc()
    finally:
        os._exit(status)


def _leave(signum, frame):
    raise SystemExit(0)


def _send_quietly(sock, message, address):
    try:
        sock.sendto(message, address)
    except OSError:
        pass  # unreachable: the retransmission timer tries again


def _try_setsockopt(sock, level, option, value):
    try:
        sock.setsockopt(level, option, value)
    except OSError:
        return False
    return True


def _udp_socket(listen, endpoint):
    """The UDP socket: bound to `listen`, or to the wildcard of the endpoint's family."""
    import socket

    if listen is not None:
        host, port = listen
    else:
        host, port = "", 0
    family = socket.AF_INET6
    if host:
        try:
            family = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0][0]
        except OSError as e:
            raise TunnelError(f"cannot resolve listen address {host}: {e}") from None
    elif endpoint is not None:
        try:
            family = socket.getaddrinfo(endpoint[0], endpoint[1], 0, socket.SOCK_DGRAM)[0][0]
        except OSError as e:
            raise TunnelError(f"cannot resolve WireGuard endpoint {endpoint[0]}: {e}") from None
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and not host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        for option, forced in ((socket.SO_RCVBUF, _SO_RCVBUFFORCE),
                               (socket.SO_SNDBUF, _SO_SNDBUFFORCE)):
            if not _try_setsockopt(sock, socket.SOL_SOCKET, forced, 4 << 20):
                _try_setsockopt(sock, socket.SOL_SOCKET, option, 4 << 20)
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    except OSError as e:
        sock.close()
        raise TunnelError(f"cannot bind the WireGuard UDP socket: {e.strerror}") from None
    return sock


def _resolve_endpoint(sock, endpoint):
    """`endpoint` (host, port) as a socket address `sock` can send to."""
    import socket

    host, port = endpoint
    try:
        results = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)
    except OSError as e:
        raise TunnelError(f"cannot resolve WireGuard endpoint {host}: {e}") from None
    for family, _, _, _, address in results:
        if family == sock.family:
            return address
    for family, _, _, _, address in results:
        if family == socket.AF_INET and sock.family == socket.AF_INET6:
            return ("::ffff:" + address[0], address[1], 0, 0)
    raise TunnelError(f"WireGuard endpoint {host} has no address the socket can reach")


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
