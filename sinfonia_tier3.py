"""sinfonia-tier3: get an edge backend deployed on a nearby cloudlet and run the
application inside a private network namespace whose only way out is a
WireGuard tunnel to that backend, without root.

Usage: sinfonia-tier3 [options] TIER1_URL APPLICATION [--] [COMMAND [ARGS...]]
"""

__version__ = "0.8.0.dev0"

__all__ = [
    "BadResponseError",
    "Datapath",
    "DeadlineError",
    "Deployment",
    "KeyCacheError",
    "NotReadyError",
    "RefusedError",
    "SinfoniaError",
    "TunnelConfig",
    "TunnelError",
    "UnavailableError",
    "UnreachableError",
    "UsageError",
    "deploy",
    "main",
    "sinfonia_tier3",
]

import fcntl
import os
import stat
import struct
import sys
import time
from collections import namedtuple

# Constants and errors ########################################################

_ALIASES = {"helloworld": "00000000-0000-0000-0000-000000000000"}
_USER_AGENT = f"sinfonia-tier3/{__version__}"
_DEFAULT_TIMEOUT = 30.0
_MAX_RESULTS = 3  # candidates Tier 1 deploys at most (it clamps `results` to 1..3)
_DEFAULT_ZEROCONF_TIMEOUT = 1.0  # seconds of mDNS answers; a LAN answers within ms
_MAX_RESPONSE_BYTES = 1 << 20  # a list of three deployments is about 2 KiB
_MAX_DETAIL_CHARS = 200  # how much of a server's error text reaches the user
_PERSISTENT_KEEPALIVE = 30  # seconds, as upstream configures its peer
_RESOLV_NDOTS = 5  # cluster-local names have up to four dots
_DEFAULT_MTU = 1420  # 1500 less 80 for IPv6, UDP and WireGuard headers (wg-quick's)
_MIN_MTU = 1280  # IPv6's minimum; the kernel drops IPv6 from smaller links


class SinfoniaError(Exception):
    """A failure of sinfonia-tier3 itself; its message is the one line shown."""

    kind = "internal"
    exit_status = 125


class UsageError(SinfoniaError):
    """The caller asked for something that cannot be done as asked."""

    kind = "usage"
    exit_status = 2


class KeyCacheError(SinfoniaError):
    """The per-application key cache cannot be used safely."""

    kind = "key_cache"


class UnreachableError(SinfoniaError):
    """The Tier 1 could not be reached (name, connection, TLS)."""

    kind = "unreachable"


class DeadlineError(SinfoniaError):
    """The Tier 1 exchange did not finish within the deadline."""

    kind = "timeout"


class RefusedError(SinfoniaError):
    """The Tier 1 answered with an HTTP error status."""

    kind = "refused"


class BadResponseError(SinfoniaError):
    """The Tier 1 answered, but not with a valid list of deployments."""

    kind = "bad_response"


class TunnelError(SinfoniaError):
    """The tunnel or the namespace around the application could not be set up."""

    kind = "tunnel"


class NotReadyError(SinfoniaError):
    """The backend never accepted a connection at a --wait-for address in time."""

    kind = "not_ready"


class UnavailableError(SinfoniaError):
    """A feature that needs something this installation does not have."""

    kind = "unavailable"


def _warn(message):
    """Tell the user about something repaired on the way; stdout is the app's."""
    print(f"sinfonia-tier3: warning: {message}", file=sys.stderr)


def _debug(message):
    """A --debug line on stderr."""
    print(f"sinfonia-tier3: debug: {message}", file=sys.stderr)


def _printable(text, limit=_MAX_DETAIL_CHARS):
    """`text` from the network made safe for one terminal line: no control
    characters, whitespace collapsed, at most `limit` characters."""
    import re

    cleaned = re.sub(r"\x1b\[[0-?]*[ -/]*[@-~]", "", str(text))  # terminal escapes
    cleaned = "".join(c if c.isprintable() else " " for c in cleaned)
    cleaned = " ".join(cleaned.split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 1] + "…"
    return cleaned


# libsodium through pynacl ####################################################

_TAG = 16
_NO_KEY = b"\0" * 32


def _sized(data, *sizes):
    """`data` as bytes, whose length must be one of `sizes`: C reads that many."""
    data = bytes(data)
    if len(data) not in sizes:
        raise ValueError(f"{len(data)} bytes where libsodium needs {sizes}")
    return data


class _Sodium:
    """The libsodium calls WireGuard needs: X25519 and the ChaCha20-Poly1305
    AEADs, with a 12-byte nonce or (XChaCha20) a 24-byte one.

    Through pynacl's cffi `lib`, which loads in 1 ms and 0.1 MiB where
    `nacl.bindings` takes 11 ms and 2.3 MiB, and which lets the datapath
    encrypt in place (`_TransportCipher`). `lib` is not a public pynacl API:
    where it is missing or incomplete (`lib` is None), or with
    `use_lib=False`, `nacl.bindings` does everything. Sizes are checked
    before they reach C. `aeads` is the function table, (encrypt, decrypt)
    by nonce size, in the calling convention of whichever of the two it is.
    """

    _AEADS = ((12, "chacha20poly1305"), (24, "xchacha20poly1305"))  # by nonce size

    def __init__(self, use_lib=True):
        self.ffi = self.lib = None
        if use_lib:
            try:
                from nacl._sodium import ffi, lib

                self._take_functions(lib)
                if lib.sodium_init() >= 0:  # without it ChaCha20 runs 3x slower
                    self.ffi, self.lib = ffi, lib
            except (ImportError, AttributeError):
                pass
        if self.lib is None:
            import nacl.bindings  # importing it runs sodium_init()

            self._take_functions(nacl.bindings)

    def _take_functions(self, functions):
        """From `lib` or `nacl.bindings`, which use the same names (but not the
        same calling conventions); AttributeError when one is missing."""
        self._scalarmult_base = functions.crypto_scalarmult_base
        self._scalarmult = functions.crypto_scalarmult
        self.aeads = {
            size: (getattr(functions, f"crypto_aead_{name}_ietf_encrypt"),
                   getattr(functions, f"crypto_aead_{name}_ietf_decrypt"))
            for size, name in self._AEADS}

    def public_key(self, private):
        private = _sized(private, 32)
        if self.lib is None:
            return self._scalarmult_base(private)
        out = self.ffi.new("unsigned char[32]")
        self._scalarmult_base(out, private)
        return bytes(out)

    def dh(self, private, public):
        """X25519; the all-zero key for a public key of low order."""
        private, public = _sized(private, 32), _sized(public, 32)
        if self.lib is None:
            from nacl.exceptions import CryptoError

            try:
                return self._scalarmult(private, public)
            except CryptoError:  # libsodium refuses low-order points
                return _NO_KEY
        out = self.ffi.new("unsigned char[32]")
        if self._scalarmult(out, private, public) != 0:
            return _NO_KEY
        return bytes(out)

    def seal(self, key, nonce, plaintext, ad):
        key, nonce = _sized(key, 32), _sized(nonce, *self.aeads)
        plaintext, ad = bytes(plaintext), bytes(ad)
        encrypt = self.aeads[len(nonce)][0]
        if self.lib is None:
            return encrypt(plaintext, ad, nonce, key)
        out = self.ffi.new("unsigned char[]", len(plaintext) + _TAG)
        encrypt(out, self.ffi.NULL, plaintext, len(plaintext), ad, len(ad), self.ffi.NULL,
                nonce, key)
        return self.ffi.buffer(out)[:]

    def open(self, key, nonce, ciphertext, ad):
        """The plaintext, or None when `ciphertext` does not authenticate."""
        key, nonce = _sized(key, 32), _sized(nonce, *self.aeads)
        ciphertext, ad = bytes(ciphertext), bytes(ad)
        if len(ciphertext) < _TAG:
            return None
        decrypt = self.aeads[len(nonce)][1]
        if self.lib is None:
            from nacl.exceptions import CryptoError

            try:
                return decrypt(ciphertext, ad, nonce, key)
            except CryptoError:
                return None
        size = len(ciphertext) - _TAG
        out = self.ffi.new("unsigned char[]", max(size, 1))
        if decrypt(out, self.ffi.NULL, self.ffi.NULL, ciphertext, len(ciphertext), ad,
                   len(ad), nonce, key) != 0:
            return None
        return self.ffi.buffer(out, size)[:]


_SODIUM = []  # this process's _Sodium, made on first use


def _sodium():
    if not _SODIUM:
        _SODIUM.append(_Sodium())
    return _SODIUM[0]


# Keys and key cache ##########################################################


class _KeyPair(namedtuple("_KeyPair", "private public")):
    """An X25519 keypair; the private half never leaves its 0600 file."""

    __slots__ = ()

    def __repr__(self):
        return f"_KeyPair(public={self.public!r})"


def _b64_key(text):
    """The 32 bytes of a key in standard or URL-safe base64; ValueError if not."""
    import base64
    import binascii

    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not a 32-byte base64 key")
    text = text.strip().replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("not a 32-byte base64 key") from None
    if len(key) != 32:
        raise ValueError("not a 32-byte base64 key")
    return key


def _key_text(key):
    """A key as WireGuard shows it: standard base64, 44 characters."""
    import base64

    return base64.b64encode(key).decode("ascii")


def _public_key(private):
    """The X25519 public key of `private` (clamped as X25519 requires)."""
    return _sodium().public_key(private)


def _generate_keypair():
    """A fresh keypair, the private key clamped as `wg genkey` does."""
    private = bytearray(os.urandom(32))
    private[0] &= 248
    private[31] = (private[31] & 127) | 64
    private = bytes(private)
    return _KeyPair(private, _public_key(private))


def _key_cache_dir():
    """`$XDG_CACHE_HOME/sinfonia`, or `~/.cache/sinfonia` (XDG rules)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sinfonia")


def _parse_key_file(text):
    """The keypair in upstream's two-line YAML format; ValueError if corrupt
    or if the public key is not the private key's."""
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            if line.strip():
                raise ValueError("unexpected line")
            continue
        fields[name.strip()] = value.strip().strip("'\"")
    try:
        keypair = _KeyPair(
            _b64_key(fields["private_key"]), _b64_key(fields["public_key"])
        )
    except KeyError as e:
        raise ValueError(f"no {e.args[0]}") from None
    if _public_key(keypair.private) != keypair.public:
        raise ValueError("public key does not belong to the private key")
    return keypair


def _prepare_private_dir(directory, what="key cache"):
    """Create `directory` if missing, make it 0700, refuse one that is not ours.

    Missing parents (such as `~/.cache`) are created 0700 too, as the XDG
    spec asks; parents that exist are left as they are.
    """
    try:
        _make_private_dir(directory)
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode):
            raise KeyCacheError(f"{what} {directory}: not a directory (or a symlink)")
        if info.st_uid != os.geteuid():
            raise KeyCacheError(f"{what} {directory}: owned by uid {info.st_uid}")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(directory, 0o700)
    except OSError as e:
        raise KeyCacheError(f"{what} {directory}: {e.strerror}") from None


def _make_private_dir(path):
    """`mkdir -p path`, every directory it makes 0700: mkdir's mode is cut by
    the umask, so each is chmodded after."""
    parent = os.path.dirname(path)
    if parent != path and not os.path.exists(parent):
        _make_private_dir(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return  # there already: left as it is (the run that made it chmods it)
    os.chmod(path, 0o700)


def _read_key_file(path):
    """The text of the key file, or None if there is none; refuses
    symlinks, other owners and anything that is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if os.path.islink(path):
            raise KeyCacheError(f"key file {path}: is a symlink, refusing it") from None
        raise KeyCacheError(f"key file {path}: {e.strerror}") from None
    with open(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyCacheError(f"key file {path}: not a regular file")
        if info.st_uid != os.geteuid():
            raise KeyCacheError(f"key file {path}: owned by uid {info.st_uid}")
        if info.st_mode & 0o077:
            try:
                os.fchmod(fd, 0o600)
            except OSError as e:
                raise KeyCacheError(f"key file {path} is readable by others and cannot "
                                    f"be made 0600: {e.strerror}") from None
            _warn(f"key file {path} was readable by others; made it 0600")
        return file.read(4096).decode("utf-8", "replace")


def _write_atomically(path, text, replace=True):
    """Write `text` to a new 0600 file at `path`: temp file in the same
    directory, fsync, rename, so readers see the old file or the whole new one.

    With `replace` false an existing file wins and False is returned.
    OSError is the caller's to translate.
    """
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o600)  # mkstemp's 0600 is cut by the umask (0277 gives 0400)
        with open(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temp, path)
        else:
            try:
                os.link(temp, path)
            except FileExistsError:
                return False
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def _store_keypair(path, keypair):
    """Save `keypair` in upstream's format unless `path` exists: False if
    another run created it meanwhile (a key file is never overwritten)."""
    text = (
        f"private_key: {_key_text(keypair.private)}\n"
        f"public_key: {_key_text(keypair.public)}\n"
    )
    try:
        return _write_atomically(path, text, replace=False)
    except OSError as e:
        raise KeyCacheError(f"key file {path}: {e.strerror}") from None


def _keep_unusable_key_file(path, text, reason):
    """Move the key file at `path`, whose content `text` is unusable, to a
    new `<path>.unreadable-<UTC time>[-N]` and warn, naming both.

    The file is locked while it is checked and moved, and moved only if it
    is still at `path` with that content: of several runs that found it,
    one moves it, and a key another run made meanwhile is never moved.
    Link then unlink, so an earlier kept file is never clobbered and the
    bytes are on disk under one name or both at every moment.
    """
    import itertools

    try:
        with open(os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK),
                  "rb") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            if (not os.path.samestat(os.fstat(file.fileno()), os.lstat(path))
                    or _read_key_file(path) != text):
                return  # another run moved it and made a new key
            base = kept = f"{path}.unreadable-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            for number in itertools.count(2):
                try:
                    os.link(path, kept)
                    break
                except FileExistsError:
                    kept = f"{base}-{number}"
            os.unlink(path)
    except FileNotFoundError:
        return  # another run moved it
    except OSError as e:
        raise KeyCacheError(f"key file {path} is unusable ({reason}) and cannot be moved "
                            f"aside: {e.strerror}") from None
    _warn(f"key file {path} is unusable ({reason}); kept it as {kept} and made a new key")


def _load_or_create_keypair(uuid):
    """The keypair cached for application `uuid`, created on first use.

    Reusing it means the Tier 1 hands back the same deployment. `uuid` must
    be canonical (it names a file).
    """
    directory = _key_cache_dir()
    _prepare_private_dir(directory)
    path = os.path.join(directory, uuid)
    for _attempt in range(3):
        text = _read_key_file(path)
        if text is None:
            keypair = _generate_keypair()
            if _store_keypair(path, keypair):
                return keypair
            continue  # another run created it meanwhile: use theirs
        try:
            return _parse_key_file(text)
        except ValueError as e:
            _keep_unusable_key_file(path, text, e)  # then make a new key (or use theirs)
    raise KeyCacheError(f"key file {path}: keeps changing under us")


# Tier 1 client and response validation #######################################


class _Endpoint(namedtuple("_Endpoint", "host port")):
    """Where a peer is: `host` a name or an IPv4 or IPv6 literal (no
    brackets), `port` an int; as text `host:port`, `[v6]:port`."""

    __slots__ = ()

    def __str__(self):
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class TunnelConfig(namedtuple("TunnelConfig", [
    "public_key",  # bytes: the cloudlet's WireGuard key
    "allowed_ips",  # ipaddress networks routed into the tunnel
    "endpoint",  # _Endpoint (host, port); str() gives host:port
    "addresses",  # ipaddress interfaces: this client's tunnel addresses
    "nameservers",  # ipaddress addresses
    "search_domains",  # str
])):
    """The WireGuard side of a deployment, validated and parsed (immutable)."""

    __slots__ = ()


class Deployment(namedtuple("Deployment", [
    "uuid",  # canonical application uuid
    "application_key",  # bytes: this client's public key, as the server has it
    "status",  # str
    "tunnel_config",  # TunnelConfig
    "deployment_name",  # str, "" when the server gave none
    "created",  # str or None
], defaults=("", None))):
    """One backend deployment offered by the Tier 1 (immutable)."""

    __slots__ = ()

    def as_json(self):
        """The deployment in the server's own field names."""
        config = self.tunnel_config
        result = {
            "UUID": self.uuid,
            "ApplicationKey": _key_text(self.application_key),
            "Status": self.status,
            "DeploymentName": self.deployment_name,
            "TunnelConfig": {
                "publicKey": _key_text(config.public_key),
                "allowedIPs": [str(n) for n in config.allowed_ips],
                "endpoint": str(config.endpoint),
                "address": [str(a) for a in config.addresses],
                "dns": [str(a) for a in config.nameservers]
                + list(config.search_domains),
            },
        }
        if self.created is not None:
            result["Created"] = self.created
        return result


def _application_uuid(application):
    """The canonical uuid of APPLICATION (a uuid or an alias); UsageError if
    it is neither."""
    import uuid

    try:
        return str(uuid.UUID(_ALIASES.get(application, application)))
    except (ValueError, TypeError, AttributeError):
        raise UsageError(
            f"application {application!r}: not a uuid nor one of "
            + ", ".join(sorted(_ALIASES))
        ) from None


def _deploy_url(tier1_url, uuid, public_key, results):
    """The deploy request URL; UsageError for a URL that is not http(s)."""
    import base64
    import urllib.parse

    parts = urllib.parse.urlsplit(tier1_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"Tier 1 URL {tier1_url!r}: expected http:// or https://")
    if parts.query or parts.fragment:
        raise UsageError(f"Tier 1 URL {tier1_url!r}: no query or fragment expected")
    key = base64.urlsafe_b64encode(public_key).decode("ascii").rstrip("=")
    path = f"{parts.path.rstrip('/')}/api/v1/deploy/{uuid}/{key}"
    query = urllib.parse.urlencode({"results": results})
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))


_IP_LITERAL_CHARACTERS = frozenset("0123456789abcdefABCDEF.:")


def _ip_literal(text, parse):
    """`text` parsed by `parse` (an `ipaddress` function) if it is a bare
    address with an optional decimal /prefix, else ValueError. `ipaddress`
    alone would also take an IPv6 zone id (`%` and then anything, a new line
    included), which would reach wg.conf and resolv.conf as it came."""
    address, slash, prefix = text.partition("/")
    if not (address and set(address) <= _IP_LITERAL_CHARACTERS) or (
        slash and not (prefix.isascii() and prefix.isdigit() and len(prefix) <= 3)
    ):
        raise ValueError("not a bare IP address")
    return parse(text)


def _is_domain_name(text):
    """Whether `text` is a syntactically valid DNS name (LDH labels, the
    last one not all digits, so that a bad IPv4 address is no name)."""
    import re

    name = text.removesuffix(".")
    return (
        0 < len(name) <= 253
        and not name.rpartition(".")[2].isdigit()
        and all(
            re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", label)
            for label in name.split(".")
        )
    )


def _host_port(text):
    """(host, port) of `text`, `name:port`, `IPv4:port` or `[IPv6]:port`, the
    host without brackets; ValueError saying what is wrong."""
    import ipaddress

    host, sep, port = text.rpartition(":")
    if not (sep and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("not host:port with a port 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            _ip_literal(host, ipaddress.IPv6Address)
        except ValueError:
            raise ValueError("not an IPv6 address in brackets") from None
        return host, int(port)
    try:
        _ip_literal(host, ipaddress.IPv4Address)
    except ValueError:
        if not _is_domain_name(host):
            raise ValueError("host is not a name or an IPv4 address") from None
    return host, int(port)


class _Validator:
    """Turns the parsed JSON of a deploy answer into Deployments; every
    problem is a BadResponseError naming the field's path."""

    def __init__(self, uuid, client_public_key):
        self.uuid = uuid
        self.client_public_key = client_public_key

    @staticmethod
    def fail(path, problem):
        raise BadResponseError(f"bad response from Tier 1: {path}: {problem}")

    def member(self, obj, path, name, kind, required=True):
        if name not in obj:
            if required:
                self.fail(f"{path}.{name}", "missing")
            return None
        value = obj[name]
        if kind is str and not isinstance(value, str):
            self.fail(f"{path}.{name}", f"expected a string, got {_json_type(value)}")
        if kind is list:
            if not isinstance(value, list):
                self.fail(f"{path}.{name}", f"expected a list, got {_json_type(value)}")
            for index, item in enumerate(value):
                if not isinstance(item, str):
                    self.fail(
                        f"{path}.{name}[{index}]",
                        f"expected a string, got {_json_type(item)}",
                    )
        if kind is dict and not isinstance(value, dict):
            self.fail(f"{path}.{name}", f"expected an object, got {_json_type(value)}")
        return value

    def key(self, obj, path, name):
        try:
            return _b64_key(self.member(obj, path, name, str))
        except ValueError as e:
            self.fail(f"{path}.{name}", str(e))

    def deployments(self, data):
        if not isinstance(data, list):
            self.fail("deployments", f"expected a list, got {_json_type(data)}")
        if not data:
            self.fail("deployments", "empty list, no deployment offered")
        return [
            self.deployment(item, f"deployments[{i}]") for i, item in enumerate(data)
        ]

    def deployment(self, obj, path):
        import uuid

        if not isinstance(obj, dict):
            self.fail(path, f"expected an object, got {_json_type(obj)}")
        try:
            app_uuid = str(uuid.UUID(self.member(obj, path, "UUID", str)))
        except ValueError:
            self.fail(f"{path}.UUID", "not a uuid")
        if app_uuid != self.uuid:
            self.fail(f"{path}.UUID", "not the requested application")
        application_key = self.key(obj, path, "ApplicationKey")
        if application_key != self.client_public_key:
            self.fail(f"{path}.ApplicationKey", "not this client's public key")
        status = _printable(self.member(obj, path, "Status", str), 100)
        name = self.member(obj, path, "DeploymentName", str, required=False) or ""
        created = self.member(obj, path, "Created", str, required=False)
        config = self.tunnel_config(
            self.member(obj, path, "TunnelConfig", dict), f"{path}.TunnelConfig"
        )
        return Deployment(
            uuid=app_uuid,
            application_key=application_key,
            status=status,
            tunnel_config=config,
            deployment_name=_printable(name, 253),
            created=None if created is None else _printable(created, 64),
        )

    def tunnel_config(self, obj, path):
        import ipaddress

        def network(text):  # host bits may be set, as in 10.0.0.2/24
            return ipaddress.ip_network(text, strict=False)

        public_key = self.key(obj, path, "publicKey")
        allowed_ips = []
        for index, text in enumerate(self.member(obj, path, "allowedIPs", list)):
            try:
                allowed_ips.append(_ip_literal(text, network))
            except ValueError:
                self.fail(f"{path}.allowedIPs[{index}]", "not an IP network")
        if not allowed_ips:
            self.fail(f"{path}.allowedIPs", "empty list")
        host, port = self.endpoint(self.member(obj, path, "endpoint", str), path)
        addresses = []
        for index, text in enumerate(self.member(obj, path, "address", list)):
            try:
                addresses.append(_ip_literal(text, ipaddress.ip_interface))
            except ValueError:
                self.fail(f"{path}.address[{index}]", "not an IP address")
        if not addresses:
            self.fail(f"{path}.address", "empty list")
        nameservers, search_domains = [], []
        for index, text in enumerate(self.member(obj, path, "dns", list)):
            try:
                nameservers.append(_ip_literal(text, ipaddress.ip_address))
            except ValueError:
                if not _is_domain_name(text):
                    self.fail(
                        f"{path}.dns[{index}]", "neither an IP address nor a domain"
                    )
                search_domains.append(text)
        return TunnelConfig(
            public_key=public_key,
            allowed_ips=tuple(allowed_ips),
            endpoint=_Endpoint(host, port),
            addresses=tuple(addresses),
            nameservers=tuple(nameservers),
            search_domains=tuple(search_domains),
        )

    def endpoint(self, text, path):
        try:
            return _host_port(text)
        except ValueError as e:
            self.fail(f"{path}.endpoint", str(e))


def _json_type(value):
    """The JSON name of a parsed value's type, for error messages."""
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "list", str: "string", type(None): "null"}
    return names.get(type(value), "number")


def _parse_deployments(body, uuid, client_public_key):
    """The deployments in a 200 answer's body (bytes); BadResponseError if
    the body is not UTF-8 JSON of the expected shape."""
    import json

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadResponseError("bad response from Tier 1: body is not UTF-8") from None
    if not text.strip():
        raise BadResponseError("bad response from Tier 1: empty body")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        cut_short = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated")
        problem = "JSON cut short" if cut_short else "not JSON"
        raise BadResponseError(
            f"bad response from Tier 1: {problem} ({e.msg}: line {e.lineno} "
            f"column {e.colno})"
        ) from None
    except ValueError:  # a number of more digits than int() converts
        raise BadResponseError("bad response from Tier 1: a number too long") from None
    except RecursionError:
        raise BadResponseError(
            "bad response from Tier 1: JSON nested too deeply"
        ) from None
    return _Validator(uuid, client_public_key).deployments(data)


def _error_detail(content_type, body):
    """What an HTTP error answer says, in a few printable words."""
    import json

    text = body.decode("utf-8", "replace")
    if "json" in content_type:
        try:
            problem = json.loads(text)
        except (ValueError, RecursionError):
            problem = None
        if isinstance(problem, dict):
            for name in ("detail", "title"):
                if isinstance(problem.get(name), str) and problem[name].strip():
                    return _printable(problem[name])
        return "(unreadable JSON error body)"
    if "html" in content_type or text.lstrip()[:1] == "<":
        return "(an HTML page)"
    return _printable(text.strip().split("\n", 1)[0]) if text.strip() else ""


def _read_bounded(response, deadline, clock):
    """The body of `response`: at most _MAX_RESPONSE_BYTES, read in chunks as
    they come so that a dripping body still ends at `deadline`."""
    declared = response.headers.get("Content-Length", "")
    length = None
    if declared.isascii() and declared.isdigit():  # int() also takes "²" and "1_0"
        length = int(declared) if len(declared) <= 18 else 1 << 62  # and refuses 5000 digits
    if length is not None and length > _MAX_RESPONSE_BYTES:
        raise BadResponseError(
            f"bad response from Tier 1: a body of {_printable(declared, 24)} bytes, "
            f"more than the {_MAX_RESPONSE_BYTES} allowed"
        )
    chunks, size = [], 0
    while True:
        if clock() > deadline:
            raise DeadlineError("Tier 1 was still sending its answer at the deadline")
        chunk = response.read1(16384)
        if not chunk:
            if length is not None and size < length:
                raise BadResponseError(
                    f"bad response from Tier 1: body cut short, {size} of {length} bytes"
                )
            return b"".join(chunks)
        size += len(chunk)
        if size > _MAX_RESPONSE_BYTES:
            raise BadResponseError(
                f"bad response from Tier 1: body larger than {_MAX_RESPONSE_BYTES} bytes"
            )
        chunks.append(chunk)


def _exchange(url, deadline, clock, hints=None):
    """POST to `url` with the `hints` headers; (status, reason, headers, body)
    of whatever answered.

    Redirects are not followed: urllib would turn the POST into a GET, which
    deploys nothing. Every transport failure becomes a SinfoniaError.
    """
    import http.client
    import socket
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect())
    request = urllib.request.Request(
        url,
        data=b"",
        method="POST",
        headers={"User-Agent": _USER_AGENT, "Accept": "application/json", **(hints or {})},
    )
    host = urllib.parse.urlsplit(url).netloc
    try:
        try:
            response = opener.open(request, timeout=max(deadline - clock(), 0.001))
        except urllib.error.HTTPError as error:
            response = error
        with response:
            body = _read_bounded(response, deadline, clock)
            return response.status, response.reason, response.headers, body
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, socket.timeout):
            raise DeadlineError(f"no answer from {host} by the deadline") from None
        if isinstance(reason, socket.gaierror):
            raise UnreachableError(
                f"cannot resolve {host}: {reason.strerror}"
            ) from None
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise UnreachableError(
                f"TLS with {host} failed: {reason.verify_message}"
            ) from None
        if isinstance(reason, ssl.SSLError):
            raise UnreachableError(f"TLS with {host} failed: {reason.reason}") from None
        if isinstance(reason, OSError):
            raise UnreachableError(
                f"cannot reach {host}: {reason.strerror or reason}"
            ) from None
        raise UnreachableError(f"cannot reach {host}: {_printable(reason)}") from None
    except socket.timeout:
        raise DeadlineError(f"no answer from {host} by the deadline") from None
    except http.client.IncompleteRead:
        raise BadResponseError(f"bad response from {host}: body cut short") from None
    except http.client.RemoteDisconnected:
        raise BadResponseError(
            f"{host} closed the connection without answering"
        ) from None
    except http.client.HTTPException as e:
        raise BadResponseError(
            f"bad response from {host}: not HTTP ({type(e).__name__})"
        ) from None
    except ConnectionError as e:
        raise BadResponseError(
            f"{host} broke the connection: {e.strerror or type(e).__name__}"
        ) from None
    except ssl.SSLError as e:
        raise UnreachableError(f"TLS with {host} failed: {e.reason}") from None


def _post_before(url, timeout, clock, hints=None):
    """`_exchange` with a hard deadline `timeout` seconds from now.

    Name resolution cannot be interrupted, so the exchange runs in a daemon
    thread that is abandoned, not waited for, when the deadline passes.
    """
    import threading

    deadline = clock() + timeout
    outcome = {}

    def work():
        try:
            outcome["answer"] = _exchange(url, deadline, clock, hints)
        except BaseException as e:  # noqa: BLE001 - re-raised in the waiting thread
            outcome["error"] = e

    worker = threading.Thread(target=work, name="sinfonia-tier1", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive() or isinstance(outcome.get("error"), DeadlineError):
        raise DeadlineError(f"no complete answer from Tier 1 within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["answer"]


def _request_deployments(tier1_url, uuid, keypair, *, results, timeout, debug=False,
                         hints=None):
    """Ask the Tier 1 to deploy `uuid` for `keypair`, telling it the `hints`
    headers (`_client_hints`); the validated list."""
    if isinstance(results, bool) or not isinstance(results, int) or results < 1:
        raise UsageError(f"results: expected a whole number >= 1, got {results!r}")
    if not timeout > 0:
        raise UsageError(f"timeout: expected seconds > 0, got {timeout!r}")
    url = _deploy_url(tier1_url, uuid, keypair.public, results)
    if debug:
        _debug(f"POST {url}" + "".join(f", {name}: {value}"
                                       for name, value in (hints or {}).items()))
    started = time.monotonic()
    status, reason, headers, body = _post_before(url, timeout, time.monotonic, hints)
    content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if debug:
        elapsed = (time.monotonic() - started) * 1000
        _debug(
            f"HTTP {status} {_printable(reason, 60)}, {content_type or 'no type'}, "
            f"{len(body)} bytes in {elapsed:.0f} ms"
        )
    if 300 <= status < 400:
        location = _printable(headers.get("Location", "elsewhere"))
        raise RefusedError(
            f"Tier 1 answered HTTP {status}, a redirect to {location}: "
            "not followed, give that URL instead"
        )
    if status != 200:
        detail = _error_detail(content_type, body)
        raise RefusedError(
            f"Tier 1 refused the deployment: HTTP {status} {_printable(reason, 60)}"
            + (f": {detail}" if detail else "")
        )
    if content_type and content_type != "application/json":
        raise BadResponseError(
            f"bad response from Tier 1: {_printable(content_type, 60)} instead of JSON"
        )
    return _parse_deployments(body, uuid, keypair.public)


def _client_hints(location=None, client_ip=None, environ=None):
    """The headers that tell Tier 1 where the client is: `X-Location` from
    `location` ("LAT,LON", or a (lat, lon) pair), `X-ClientIP` from
    `client_ip`, each taken from $SINFONIA_LOCATION / $SINFONIA_CLIENT_IP when
    not given. Upstream's Tier 1 reads them as `float(lat),float(lon)` and
    `ip_address(...)`, and forwards both to the Tier 2s; UsageError when one
    is not valid."""
    import ipaddress
    import math

    environ = os.environ if environ is None else environ

    def given_or_environment(value, name, variable):
        """The value and where it came from, for error messages."""
        if value is None and environ.get(variable):
            return environ[variable], variable
        return value, name

    hints = {}
    location, where = given_or_environment(location, "location", "SINFONIA_LOCATION")
    if location is not None:
        try:
            parts = location.split(",") if isinstance(location, str) else list(location)
            latitude, longitude = (float(part) for part in parts)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected LAT,LON in degrees, got {location!r}") \
                from None
        if not (math.isfinite(latitude) and -90 <= latitude <= 90
                and math.isfinite(longitude) and -180 <= longitude <= 180):
            raise UsageError(f"{where}: {location!r} is not a place (latitude -90 to 90, "
                             "longitude -180 to 180)")
        hints["X-Location"] = f"{latitude!r},{longitude!r}"
    client_ip, where = given_or_environment(client_ip, "client_ip", "SINFONIA_CLIENT_IP")
    if client_ip is not None:
        try:
            hints["X-ClientIP"] = str(_ip_literal(str(client_ip), ipaddress.ip_address))
        except ValueError:
            raise UsageError(f"{where}: {client_ip!r} is not an IP address") from None
    return hints


# Local Tier 2s by multicast DNS ##############################################
#
# A Tier 2 started with --zeroconf announces itself through python-zeroconf:
# a PTR from the service type `_sinfonia._tcp.local.` to its instance
# (`cloudlet._sinfonia._tcp.local.`, renamed on a clash), the instance's SRV
# (API port, host name) and TXT (`path=/`), the host's A record. The client
# asks with legacy unicast queries (RFC 6762 §6.7): sent from an ordinary
# port to the group on every interface, they are answered straight back to
# that port, so it needs neither port 5353 nor group membership. Every
# answer is hostile: a malformed packet is dropped whole.

_MDNS_GROUP = ("224.0.0.251", 5353)
_SINFONIA_SERVICE = (b"_sinfonia", b"_tcp", b"local")
_DNS_A, _DNS_PTR, _DNS_TXT, _DNS_AAAA, _DNS_SRV = 1, 12, 16, 28, 33
_DNS_CLASS_IN = 1
_MAX_TIER2S = 8  # instances taken from the answers; the rest are ignored
_MAX_MDNS_NAMES = 64  # names kept per record type (other services answer too)
_MAX_INTERFACES = 64  # interfaces a query goes out on


class _MdnsRecord(namedtuple("_MdnsRecord", "name type value")):
    """One answer: `name` a tuple of lower-case labels (bytes); `value` a name
    (PTR), (port, host name) (SRV), a tuple of byte strings (TXT), an
    ipaddress address (A, AAAA)."""

    __slots__ = ()


def _dns_name(packet, offset):
    """(name, offset after it) of the name at `offset`: its lower-cased
    labels. ValueError for one that runs off the packet, uses a reserved
    label type or is longer than 255 bytes. Each compression pointer must
    point before the previous jump's target, so that following them ends."""
    labels, after, size, limit = [], None, 0, offset
    while True:
        if offset >= len(packet):
            raise ValueError("a name runs off the packet")
        length = packet[offset]
        if length >= 0xC0:
            if offset + 1 >= len(packet):
                raise ValueError("a compression pointer runs off the packet")
            target = ((length & 0x3F) << 8) | packet[offset + 1]
            if target >= limit:
                raise ValueError("a compression pointer that does not point back")
            if after is None:
                after = offset + 2
            offset = limit = target
            continue
        if length > 63:
            raise ValueError("a reserved label type")
        offset += 1
        if length == 0:
            return tuple(labels), (offset if after is None else after)
        size += length + 1
        if offset + length > len(packet) or size > 255:
            raise ValueError("a label runs off the packet or the name is too long")
        labels.append(bytes(packet[offset:offset + length]).lower())
        offset += length


def _record_value(packet, kind, start, end):
    """The value of a record of type `kind` whose data is packet[start:end];
    None for a type not needed here; ValueError when the data is not of its type."""
    import ipaddress

    if kind in (_DNS_A, _DNS_AAAA):
        if end - start != (4 if kind == _DNS_A else 16):
            raise ValueError("an address record of the wrong size")
        return ipaddress.ip_address(bytes(packet[start:end]))
    if kind == _DNS_PTR:
        name, after = _dns_name(packet, start)
    elif kind == _DNS_SRV:
        if end - start < 7:
            raise ValueError("an SRV record too short")
        (port,) = struct.unpack_from("!H", packet, start + 4)
        host, after = _dns_name(packet, start + 6)
        name = (port, host)
    elif kind == _DNS_TXT:
        strings, offset = [], start
        while offset < end:
            length = packet[offset]
            if offset + 1 + length > end:
                raise ValueError("a TXT string runs off its record")
            strings.append(bytes(packet[offset + 1:offset + 1 + length]))
            offset += 1 + length
        return tuple(strings)
    else:
        return None
    if after != end:
        raise ValueError("a name that does not fill its record")
    return name


def _parse_mdns(packet):
    """(id, records) of an mDNS response: its answers of class IN that are
    not goodbyes (TTL 0); (id, ()) for a query. None for anything malformed:
    cut short, counts larger than the records, names that loop, records
    whose data is not of their type."""
    try:
        ident, flags, questions, *counts = struct.unpack_from("!6H", packet)
        if not flags & 0x8000:
            return ident, ()
        offset = 12
        for _ in range(questions):  # each at least 5 bytes: a huge count runs off the end
            offset = _dns_name(packet, offset)[1] + 4
        records = []
        for _ in range(sum(counts)):
            name, offset = _dns_name(packet, offset)
            kind, klass, ttl, length = struct.unpack_from("!HHIH", packet, offset)
            start, end = offset + 10, offset + 10 + length
            if end > len(packet):
                raise ValueError("a record runs off the packet")
            value = _record_value(packet, kind, start, end)
            if value is not None and klass & 0x7FFF == _DNS_CLASS_IN and ttl:
                records.append(_MdnsRecord(name, kind, value))
            offset = end
        return ident, records
    except (ValueError, struct.error):
        return None


def _mdns_query(ident, questions):
    """A query packet asking `questions`, (name, type) pairs, names as labels."""
    packet = [struct.pack("!6H", ident, 0, len(questions), 0, 0, 0)]
    for name, kind in questions:
        packet += [bytes((len(label),)) + label for label in name]
        packet.append(b"\0" + struct.pack("!HH", kind, _DNS_CLASS_IN))
    return b"".join(packet)


class _Tier2Answers:
    """What the answers so far say about Tier 2s announcing `_sinfonia._tcp`."""

    def __init__(self):
        self.instances = []  # instance names, in the order first seen
        self.services = {}  # instance -> (port, host name)
        self.texts = {}  # instance -> TXT strings
        self.addresses = {}  # host name -> addresses

    def add(self, records):
        """Keep what `records` say; a flood of answers fills at most
        _MAX_MDNS_NAMES names of each kind."""
        for record in records:
            name, kind, value = record
            if kind == _DNS_PTR and name == _SINFONIA_SERVICE:
                if (value[1:] == _SINFONIA_SERVICE and value not in self.instances
                        and len(self.instances) < _MAX_TIER2S):
                    self.instances.append(value)
            elif kind in (_DNS_SRV, _DNS_TXT):
                kept = self.services if kind == _DNS_SRV else self.texts
                if name in kept or len(kept) < _MAX_MDNS_NAMES:
                    kept[name] = value
            elif kind in (_DNS_A, _DNS_AAAA):
                known = self.addresses.get(name)
                if known is None and len(self.addresses) < _MAX_MDNS_NAMES:
                    known = self.addresses[name] = []
                if known is not None and len(known) < 8:
                    known.append(value)

    def questions(self):
        """The service, and what is still missing of the instances found."""
        wanted = [(_SINFONIA_SERVICE, _DNS_PTR)]
        for instance in self.instances:
            if instance not in self.services:
                wanted += [(instance, _DNS_SRV), (instance, _DNS_TXT)]
            elif self.services[instance][1] not in self.addresses:
                wanted.append((self.services[instance][1], _DNS_A))
        return wanted

    def urls(self):
        """The base URL of each complete instance (`http://address:port/path`):
        its first IPv4 address, else its first IPv6 one that needs no zone
        (not link-local). Instances with a port 0 or an odd path are left out."""
        import re

        urls = []
        for instance in self.instances:
            port, host = self.services.get(instance, (0, None))
            addresses = sorted(self.addresses.get(host, ()), key=lambda a: a.version)
            addresses = [a for a in addresses if not a.is_link_local or a.version == 4]
            path = b"/"
            for text in self.texts.get(instance, ()):
                key, _, value = text.partition(b"=")
                if key.lower() == b"path":
                    path = value
            if not (port and addresses and re.fullmatch(rb"/[A-Za-z0-9._~/-]{0,200}", path)):
                continue
            host = f"[{addresses[0]}]" if addresses[0].version == 6 else addresses[0]
            url = f"http://{host}:{port}{path.decode('ascii')}"
            if url not in urls:
                urls.append(url)
        return urls


def _send_to_every_interface(sock, packet):
    """Send `packet` to the mDNS group out of each interface (those that are
    down or have no IPv4 refuse, quietly)."""
    import socket

    for index, _ in socket.if_nameindex()[:_MAX_INTERFACES]:
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                            struct.pack("=4s4si", bytes(4), bytes(4), index))  # ip_mreqn
            sock.sendto(packet, _MDNS_GROUP)
        except OSError:
            pass


def _find_tier2s(timeout, *, clock=time.monotonic):
    """Base URLs of the Tier 2s that answer mDNS within `timeout` seconds.

    All answers in that time count (there may be several Tier 2s); the
    query goes out at the start and again half way, then also asking for
    what the first answers left out."""
    import random
    import select
    import socket

    answers = _Tier2Answers()
    idents = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)  # as RFC 6762 asks
        sock.bind(("0.0.0.0", 0))
        start = clock()
        for until in (start + timeout / 2, start + timeout):
            ident = random.randrange(1, 1 << 16)
            idents.add(ident)
            _send_to_every_interface(sock, _mdns_query(ident, answers.questions()))
            while True:
                left = until - clock()
                if left <= 0 or not select.select([sock], [], [], left)[0]:
                    break
                parsed = _parse_mdns(sock.recv(9000))
                if parsed is not None and parsed[0] in idents:
                    answers.add(parsed[1])
    return answers.urls()


def _deploy_on_tier2s(urls, uuid, keypair, *, results, timeout, debug, hints):
    """Ask each Tier 2 at `urls` at once to deploy; ([(deployment, url)],
    [why each one that did not failed])."""
    import threading

    outcomes = {}

    def ask(url):
        try:
            outcomes[url] = _request_deployments(url, uuid, keypair, results=results,
                                                 timeout=timeout, debug=debug, hints=hints)
        except SinfoniaError as e:
            outcomes[url] = e

    workers = [threading.Thread(target=ask, args=(url,), name="sinfonia-tier2", daemon=True)
               for url in urls]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()  # each ends by its own deadline
    offered, failures = [], []
    for url in urls:
        if isinstance(outcomes[url], SinfoniaError):
            failures.append(f"{url}: {outcomes[url]}")
        else:
            offered += [(deployment, url) for deployment in outcomes[url]]
    return offered, failures


def _offered_deployments(tier1_url, uuid, keypair, *, results, timeout, debug=False,
                         hints=None, zeroconf=False,
                         zeroconf_timeout=_DEFAULT_ZEROCONF_TIMEOUT):
    """[(deployment, the URL that offered it)]: from the Tier 2s found by
    zeroconf, when asked to and one of them deploys; else from the Tier 1,
    saying so on stderr when zeroconf found none."""
    if zeroconf:
        if not 0 < zeroconf_timeout <= 60:
            raise UsageError(f"zeroconf_timeout: expected seconds from 0 to 60, got "
                             f"{zeroconf_timeout!r}")
        started = time.monotonic()
        urls = _find_tier2s(zeroconf_timeout)
        if debug:
            _debug(f"zeroconf: {len(urls)} Tier 2 found in "
                   f"{(time.monotonic() - started) * 1000:.0f} ms"
                   + "".join(f", {url}" for url in urls))
        if urls:
            offered, failures = _deploy_on_tier2s(urls, uuid, keypair, results=results,
                                                  timeout=timeout, debug=debug, hints=hints)
            if offered:
                return offered
            print(f"sinfonia-tier3: no Tier 2 found by zeroconf deployed "
                  f"({'; '.join(failures)}); asking {tier1_url}", file=sys.stderr)
        else:
            print(f"sinfonia-tier3: no Tier 2 answered zeroconf within "
                  f"{zeroconf_timeout:g} s; asking {tier1_url}", file=sys.stderr)
    deployments = _request_deployments(tier1_url, uuid, keypair, results=results,
                                       timeout=timeout, debug=debug, hints=hints)
    return [(deployment, tier1_url) for deployment in deployments]


def deploy(tier1_url, application, *, results=1, timeout=_DEFAULT_TIMEOUT, location=None,
           client_ip=None, zeroconf=False):
    """Ask the Tier 1 at `tier1_url` to deploy `application` (a uuid or an
    alias) for this user's cached key; returns the offered deployments.

    `location` ("LAT,LON" or a pair) and `client_ip` tell Tier 1 where the
    client is (default: $SINFONIA_LOCATION, $SINFONIA_CLIENT_IP). With
    `zeroconf`, the Tier 2s on the local network that answer mDNS within a
    second are asked instead, and `tier1_url` only when none deploys.
    Raises a SinfoniaError subclass whose message says what went wrong.
    """
    uuid = _application_uuid(application)
    hints = _client_hints(location, client_ip)
    keypair = _load_or_create_keypair(uuid)
    offered = _offered_deployments(tier1_url, uuid, keypair, results=results,
                                   timeout=timeout, hints=hints, zeroconf=zeroconf)
    return [deployment for deployment, _ in offered]


# Rendered files: wg-quick and resolv.conf ####################################


def _render_resolv_conf(config):
    """resolv.conf for the application: the cloudlet's nameservers and
    search domains; ndots so that `helloworld` is tried as a service first."""
    lines = [f"nameserver {address}" for address in config.nameservers]
    if config.search_domains:
        lines.append("search " + " ".join(config.search_domains))
    lines.append(f"options ndots:{_RESOLV_NDOTS}")
    return "\n".join(lines) + "\n"


def _render_wg_quick(config, keypair, included_applications=()):
    """The tunnel in wg-quick format (what `wg-quick strip` turns into a
    `wg setconf` file); `included_applications` is the WireGuard Android
    app's per-app list, as upstream puts it in the QR code."""
    lines = [
        "[Interface]",
        f"PrivateKey = {_key_text(keypair.private)}",
        "Address = " + ", ".join(str(a) for a in config.addresses),
    ]
    dns = [str(a) for a in config.nameservers] + list(config.search_domains)
    if dns:
        lines.append("DNS = " + ", ".join(dns))
    if included_applications:
        lines.append("IncludedApplications = " + ", ".join(included_applications))
    lines += [
        "",
        "[Peer]",
        f"PublicKey = {_key_text(config.public_key)}",
        f"Endpoint = {config.endpoint}",
        f"PersistentKeepalive = {_PERSISTENT_KEEPALIVE}",
        "AllowedIPs = " + ", ".join(str(n) for n in config.allowed_ips),
    ]
    return "\n".join(lines) + "\n"


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

_MSG_INITIATION, _MSG_RESPONSE, _MSG_COOKIE, _MSG_TRANSPORT = 1, 2, 3, 4
_INITIATION_SIZE, _RESPONSE_SIZE, _COOKIE_SIZE = 148, 92, 64
_TRANSPORT_HEADER = struct.Struct("<IIQ")  # type, receiver index, counter
_TRANSPORT_HEADER_SIZE = _TRANSPORT_HEADER.size
_KEEPALIVE_SIZE = _TRANSPORT_HEADER_SIZE + _TAG
_TAI64_BASE = (1 << 62) + 10
_HANDSHAKE_NONCE = bytes(12)  # counter 0: each handshake key seals one message
_U32_BE = struct.Struct(">I")
_U64_PAIR_BE = struct.Struct(">QQ")
_U32_LE = struct.Struct("<I")
_U64_LE = struct.Struct("<Q")


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


def _tai64n(nanoseconds):
    seconds, nanos = divmod(nanoseconds, 1_000_000_000)
    return struct.pack(">QI", _TAI64_BASE + seconds, nanos)


def _dh(private, public):
    """X25519, or None for a public key of low order (all-zero shared secret)."""
    shared = _sodium().dh(private, public)
    return None if shared == _NO_KEY else shared


class _SessionKeys:
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

    __slots__ = ("chain", "ephemeral", "hash", "local_index", "mac1", "retries")

    def __init__(self, local_index, ephemeral, chain, hash_, mac1, retries):
        self.local_index = local_index
        self.ephemeral = ephemeral
        self.chain = chain
        self.hash = hash_
        self.mac1 = mac1
        # Retransmissions so far in this round. Counted rather than timed, as
        # the kernel and wireguard-go do: with the jitter added to each retry,
        # a time limit would give up after a varying number of attempts.
        self.retries = retries


class _CookieChecker:
    """The responder's side of mac1 and mac2, as wireguard-go's CookieChecker:
    whether a handshake message sent to us may be processed.

    mac1, keyed by our public key, must always be right. After more than
    _UNDER_LOAD_HANDSHAKES such messages in a second we are under load for a
    second, and then mac2 must be right too: it is keyed by the cookie we
    give the sender's address (from a secret renewed every
    COOKIE_REFRESH_TIME), which proves that the sender receives there. A
    message without it gets a cookie reply instead; senders that proved
    their address are still rate-limited.
    """

    def __init__(self, public_key, random, now):
        self.mac1_key = _hash(_WG_LABEL_MAC1, public_key)
        self.cookie_key = _hash(_WG_LABEL_COOKIE, public_key)
        self.random = random
        self.secret = random(32)
        self.secret_born = now
        self.load_window_start = -1e9
        self.load_count = 0
        self.under_load_until = -1e9
        self.rate_buckets = {}  # source host -> (tokens, time), used under load

    def check(self, message, address, now, transmit):
        """Whether `message` from `address` may be processed; when it may not
        for want of mac2, the cookie reply goes out by `transmit(reply, address)`."""
        import hmac

        if not hmac.compare_digest(message[-32:-16], _mac(self.mac1_key, message[:-32])):
            return False
        if now - self.load_window_start >= 1.0:
            self.load_window_start, self.load_count = now, 0
        self.load_count += 1
        if self.load_count > _UNDER_LOAD_HANDSHAKES:
            self.under_load_until = now + 1.0
        if now >= self.under_load_until:
            return True
        if now - self.secret_born >= _COOKIE_REFRESH_TIME:
            self.secret, self.secret_born = self.random(32), now
        cookie = _mac(self.secret, repr(address[:2]).encode())
        if hmac.compare_digest(message[-16:], _mac(cookie, message[:-16])):
            return self._within_rate(address[0], now)
        nonce = self.random(24)
        sealed = _sodium().seal(self.cookie_key, nonce, cookie, message[-32:-16])
        transmit(_U32_LE.pack(_MSG_COOKIE) + message[4:8] + nonce + sealed, address)
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


class _CookieGenerator:
    """The sender's side of mac1 and mac2, as wireguard-go's CookieGenerator:
    the MACs of the handshake messages we send, mac2 keyed by the cookie the
    peer under load sent us (all zeros without one, or once it is stale)."""

    def __init__(self, peer_public_key):
        self.mac1_key = _hash(_WG_LABEL_MAC1, peer_public_key)
        self.cookie_key = _hash(_WG_LABEL_COOKIE, peer_public_key)
        self.cookie = None
        self.cookie_received = -1e9

    def add_macs(self, message, now):
        """`message` with mac1 and mac2 appended, and the mac1 (which a cookie
        reply to the message is bound to)."""
        mac1 = _mac(self.mac1_key, message)
        message += mac1
        if self.cookie is not None and now - self.cookie_received < _COOKIE_REFRESH_TIME:
            return message + _mac(self.cookie, message), mac1
        return message + bytes(16), mac1

    def consume_reply(self, reply, mac1, now):
        """Keep the cookie in `reply`, the answer to our message with `mac1`,
        for the mac2 of later messages; a reply not from our peer is ignored."""
        cookie = _sodium().open(self.cookie_key, reply[8:32], reply[32:64], mac1)
        if cookie is not None:
            self.cookie, self.cookie_received = cookie, now


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


class _TransportCipher:
    """ChaCha20-Poly1305 for transport data, in place. The arguments come in
    `_Sodium`'s order (key, nonce, data), the nonce given as its counter:
    `seal(key, counter, slot, length)` encrypts `length` bytes of `slot`
    where they are (the tag follows), `open(key, counter, slot, offset, size,
    out)` decrypts `size` bytes at `offset` into slot `out` and returns the
    plaintext length, or None when they do not authenticate. Slots are what
    `slot(buffer, offset)` returned.

    Built on the function table of a `_Sodium` (`use_lib` as there). Fast
    path: libsodium through pynacl's cffi `lib` straight into the buffers.
    Fallback: `nacl.bindings`, plus copies. Both are closures over their
    state, which saves attribute look-ups per packet.
    """

    def __init__(self, use_lib=True):
        sodium = _sodium() if use_lib else _Sodium(use_lib=False)
        self.use_lib = sodium.lib is not None
        encrypt, decrypt = sodium.aeads[12]
        if self.use_lib:
            self._cffi_closures(sodium.ffi, encrypt, decrypt)
        else:
            self._bindings_closures(encrypt, decrypt)

    def _cffi_closures(self, ffi, encrypt, decrypt):
        null, nonce = ffi.NULL, bytearray(12)
        nonce_pointer, pack_nonce = ffi.from_buffer(nonce), _U64_LE.pack_into

        def seal(key, counter, slot, length):
            pack_nonce(nonce, 4, counter)
            encrypt(slot, null, slot, length, null, 0, null, nonce_pointer, key)

        def open_(key, counter, slot, offset, size, out):
            pack_nonce(nonce, 4, counter)
            if size < _TAG or decrypt(out, null, null, slot + offset, size, null, 0,
                                      nonce_pointer, key):
                return None
            return size - _TAG

        self.seal, self.open = seal, open_
        self.slot = lambda buffer, offset: ffi.from_buffer(memoryview(buffer)[offset:])

    def _bindings_closures(self, encrypt, decrypt):
        from nacl.exceptions import CryptoError

        def seal(key, counter, slot, length):
            nonce = _nonce(counter)
            slot[:length + _TAG] = encrypt(bytes(slot[:length]), None, nonce, key)

        def open_(key, counter, slot, offset, size, out):
            try:
                out[:size - _TAG] = decrypt(bytes(slot[offset:offset + size]), None,
                                            _nonce(counter), key)
            except CryptoError:  # forged or corrupt
                return None
            return size - _TAG

        self.seal, self.open = seal, open_
        self.slot = lambda buffer, offset: memoryview(buffer)[offset:]


# Shared counters: written by the process that knows, read by the others.
# _CONTROL_MESSAGES: how many messages the control process has sent to the
# encrypting one (see `_send_loop`). What tells whether the peer still
# answers (monotonic times, 0 for none): _LAST_RECEIVED, the last packet
# that authenticated; _UNANSWERED_SINCE, the first data sent after it;
# _HANDSHAKE_PENDING_SINCE, the first initiation not answered yet.
(_TX_BYTES, _RX_BYTES, _LAST_SENT, _LAST_DATA_SENT, _LAST_HANDSHAKE_WALL, _CONTROL_MESSAGES,
 _HANDSHAKES_ABANDONED, _LAST_RECEIVED, _UNANSWERED_SINCE, _HANDSHAKE_PENDING_SINCE) = range(10)
_COUNTERS = 10


def _shared_counters(area=None):
    """Doubles that forked processes share, all reset: the start of `area`
    (an mmap), or of a new anonymous mmap."""
    import mmap

    counters = memoryview(area if area is not None else mmap.mmap(-1, 8 * _COUNTERS))
    counters = counters[:8 * _COUNTERS].cast("d")
    for index in range(_COUNTERS):
        counters[index] = 0.0
    counters[_LAST_SENT] = counters[_LAST_DATA_SENT] = -1e9
    return counters


class _Peer:
    """The WireGuard protocol for one peer: handshakes, session keys, timers;
    mac1, mac2 and cookies through its `cookie_checker` (messages to us) and
    `cookie_generator` (messages from us).

    Pure state, no I/O: `clock` is injectable and every output goes through
    the hooks, so tests drive two instances against each other in one process.
    Hooks (set by the owner): `transmit(datagram, address)` sends a handshake
    or cookie message; `sender` is the object encrypting outgoing data
    (`install(session_keys)`, `set_endpoint(address)`, `keepalive()`,
    `drop_queue()`): a `_Sender`, or its proxy in another process.
    """

    def __init__(self, private_key, peer_public_key, *, preshared_key=None,
                 allowed_ips=(), persistent_keepalive=0, endpoint=None,
                 clock=None, wallclock_ns=None, random=os.urandom, cipher=None,
                 counters=None):
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
        # handshake and session keys
        self.handshake = None
        self.current = self.previous = self.next = None
        self.session_keys_by_index = {}  # local index -> _SessionKeys, for receiving
        self.last_timestamp = b""
        self.stamp_sent_ns = 0
        self.last_initiation_consumed = -1e9
        self.last_initiation_sent = -1e9
        self.retransmit_at = None
        self.last_response_mac1 = None  # (local index, mac1) of our last response
        # mac1, mac2 and cookies
        self.cookie_checker = _CookieChecker(self.public_key, random, self.clock())
        self.cookie_generator = _CookieGenerator(self.peer_public_key)
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
        static = _sodium().seal(key, _HANDSHAKE_NONCE, self.public_key, hash_)
        hash_ = _hash(hash_, static)
        chain, key = _kdf(chain, self.static_secret, 2)
        self.stamp_sent_ns = max(self.wallclock_ns(), self.stamp_sent_ns + 1)
        timestamp = _sodium().seal(key, _HANDSHAKE_NONCE, _tai64n(self.stamp_sent_ns), hash_)
        hash_ = _hash(hash_, timestamp)
        retries = self.handshake.retries + 1 if retry and self.handshake else 0
        self._forget_handshake()
        if not retry and not self.counters[_HANDSHAKE_PENDING_SINCE]:
            self.counters[_HANDSHAKE_PENDING_SINCE] = now
        index = self._new_index()
        message = struct.pack("<II", _MSG_INITIATION, index) + ephemeral_public + static + timestamp
        message, mac1 = self.cookie_generator.add_macs(message, now)
        self.handshake = _Handshake(index, ephemeral, chain, hash_, mac1, retries)
        self.session_keys_by_index[index] = None  # reserved until the response or next attempt
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
        inbox, inbox_handle, by_index = self.inbox, self.inbox_handle, self.session_keys_by_index
        plain, plain_handle, open_ = self.plain, self.plain_handle, self.cipher.open
        unpack, packet_length = _TRANSPORT_HEADER.unpack_from, self.allowed.packet_length
        ring_mask, window, too_many = _REPLAY_WINDOW - 1, _REPLAY_WINDOW, _REJECT_AFTER_MESSAGES
        received = data = 0
        session_keys = None
        roaming = address != self.endpoint
        for start in range(0, size, segment):
            end = min(start + segment, size)
            if end - start < _KEEPALIVE_SIZE:
                continue
            kind, index, counter = unpack(inbox, start)
            if kind != _MSG_TRANSPORT:
                if kind in (_MSG_INITIATION, _MSG_RESPONSE, _MSG_COOKIE):
                    self._receive_handshake(bytes(inbox[start:end]), address, now)
                    session_keys = None  # the message may have retired them
                continue
            if session_keys is None or index != session_keys.local_index:
                session_keys = by_index.get(index)
                if session_keys is None or now - session_keys.created >= _REJECT_AFTER_TIME:
                    session_keys = None
                    continue
                key, ring = session_keys.receive_key, session_keys.replay_ring
                unconfirmed = session_keys is self.next
            place = counter & ring_mask
            if (ring[place] == counter or session_keys.replay_top - counter >= window
                    or counter >= too_many):
                continue  # replayed, too old, or past the limit
            length = open_(key, counter, inbox_handle, start + _TRANSPORT_HEADER_SIZE,
                           end - start - _TRANSPORT_HEADER_SIZE, plain_handle)
            if length is None:
                continue
            ring[place] = counter
            session_keys.replay_top = max(session_keys.replay_top, counter)
            received += end - start
            # Endpoint and session keys change before the packet reaches the TUN:
            # an answer to it must find them in place.
            if roaming:
                roaming = False
                self._roam(address)
            if unconfirmed:
                unconfirmed = False
                self._confirm_next(now)
            if length:
                data = True
                length = packet_length(plain, length)
                if length:
                    deliver(length)
        if received:
            counters = self.counters
            counters[_RX_BYTES] += received
            counters[_LAST_RECEIVED] = now
            counters[_UNANSWERED_SINCE] = 0.0
            self.last_received = now
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
        check = self.cookie_checker.check
        if kind == _MSG_INITIATION and size == _INITIATION_SIZE:
            if check(message, address, now, self.transmit):
                self._consume_initiation(message, address, now)
        elif kind == _MSG_RESPONSE and size == _RESPONSE_SIZE:
            if check(message, address, now, self.transmit):
                self._consume_response(message, address, now)
        elif kind == _MSG_COOKIE and size == _COOKIE_SIZE:
            self._consume_cookie(message, now)

    def _consume_initiation(self, message, address, now):
        """Responder: check an initiation, answer it, keep the session keys as `next`."""
        import hmac

        ephemeral = message[8:40]
        chain = _kdf(self.initial_chain, ephemeral, 1)[0]
        hash_ = _hash(self.responder_hash, ephemeral)
        shared = _dh(self.private_key, ephemeral)
        if shared is None:
            return
        chain, key = _kdf(chain, shared, 2)
        static = _sodium().open(key, _HANDSHAKE_NONCE, message[40:88], hash_)
        if static is None or not hmac.compare_digest(static, self.peer_public_key):
            return
        hash_ = _hash(hash_, message[40:88])
        chain, key = _kdf(chain, self.static_secret, 2)
        stamp = _sodium().open(key, _HANDSHAKE_NONCE, message[88:116], hash_)
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
        empty = _sodium().seal(key, _HANDSHAKE_NONCE, b"", hash_)
        remote_index = _U32_LE.unpack_from(message, 4)[0]
        index = self._new_index()
        response = struct.pack("<III", _MSG_RESPONSE, index, remote_index) + ephemeral_public + empty
        response, mac1 = self.cookie_generator.add_macs(response, now)
        receive_key, send_key = _kdf(chain, b"", 2)
        if self.next is not None:
            self.session_keys_by_index.pop(self.next.local_index, None)
        self.next = _SessionKeys(send_key, receive_key, index, remote_index, now, False)
        self.session_keys_by_index[index] = self.next
        self.last_response_mac1 = (index, mac1)
        self.last_received = now
        self._roam(address)
        self._transmit(response, now)

    def _consume_response(self, message, address, now):
        """Initiator: finish the handshake; the new session keys are used at once."""
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
        if _sodium().open(key, _HANDSHAKE_NONCE, message[44:60], hash_) != b"":
            return
        send_key, receive_key = _kdf(chain, b"", 2)
        session_keys = _SessionKeys(send_key, receive_key, handshake.local_index, sender_index,
                                    now, True)
        self.handshake = None
        self.retransmit_at = None
        # Responder session keys still waiting for their confirmation may be
        # what the peer sends with (both sides initiated at once): as the
        # kernel does, they stay for receiving as the previous ones, and the
        # current ones go.
        retired = self.current if self.next is not None else self.previous
        if retired is not None:
            self.session_keys_by_index.pop(retired.local_index, None)
        self.previous = self.next if self.next is not None else self.current
        self.current, self.next = session_keys, None
        self.session_keys_by_index[session_keys.local_index] = session_keys
        self.last_received = now
        self._roam(address)
        self._handshake_complete(now)

    def _confirm_next(self, now):
        """Responder: the initiator used the new session keys, so they become current."""
        if self.previous is not None:
            self.session_keys_by_index.pop(self.previous.local_index, None)
        self.previous, self.current, self.next = self.current, self.next, None
        self._handshake_complete(now)

    def _handshake_complete(self, now):
        self.last_handshake = now
        self.counters[_LAST_HANDSHAKE_WALL] = self.wallclock_ns() / 1e9
        if self.handshake is None:
            self.counters[_HANDSHAKE_PENDING_SINCE] = 0.0
        self.sender.install(self.current)

    def _consume_cookie(self, message, now):
        """Initiator (or responder): a cookie reply to our pending initiation or
        our last response goes to the cookie generator."""
        index = _U32_LE.unpack_from(message, 4)[0]
        if self.handshake is not None and index == self.handshake.local_index:
            mac1 = self.handshake.mac1
        elif self.last_response_mac1 is not None and index == self.last_response_mac1[0]:
            mac1 = self.last_response_mac1[1]
        else:
            return
        self.cookie_generator.consume_reply(message, mac1, now)

    # -- timers ---------------------------------------------------------------

    def tick(self, now=None):
        """Run the timer state machine; call it a few times a second."""
        now = self.clock() if now is None else now
        counters = self.counters
        last_sent, last_data_sent = counters[_LAST_SENT], counters[_LAST_DATA_SENT]
        handshake = self.handshake
        if handshake is not None and now >= self.retransmit_at:
            if handshake.retries >= _REKEY_ATTEMPT_TIME / _REKEY_TIMEOUT:
                counters[_HANDSHAKES_ABANDONED] += 1
                self._forget_handshake()
                self.retransmit_at = None
                self.sender.drop_queue()  # what waited for this handshake is stale
            else:
                self.initiate(now, retry=True)
        if self.last_handshake is not None and now - self.last_handshake >= 3 * _REJECT_AFTER_TIME:
            self._forget_session_keys()
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
            if index not in self.session_keys_by_index:
                return index

    def _forget_handshake(self):
        if self.handshake is not None:
            if self.session_keys_by_index.get(self.handshake.local_index, 0) is None:
                del self.session_keys_by_index[self.handshake.local_index]
            self.handshake = None

    def _forget_session_keys(self):
        self.current = self.previous = self.next = None
        self.session_keys_by_index = {  # the indices reserved for a handshake stay
            index: None for index, session_keys in self.session_keys_by_index.items()
            if session_keys is None}
        self.last_handshake = None
        self.sender.install(None)


class _ProbeSender:
    """The sender of a `_Peer` that only shakes hands: it keeps the session
    keys the handshake installs and sends nothing."""

    def __init__(self):
        self.session_keys = None

    def install(self, session_keys):
        self.session_keys = session_keys

    def set_endpoint(self, endpoint):
        pass

    def keepalive(self):
        pass

    def drop_queue(self):
        pass


def _handshake_round_trips(private_key, configs, timeout, *, wait_for_all=False,
                           clock=time.monotonic):
    """Shake hands with the cloudlet of each TunnelConfig in `configs`, all at
    once, each through a `_Peer` over a plain UDP socket of this process: for
    each, in order, the round trip in seconds of the initiation it answered
    (retransmissions count from the last), or the reason it did not. Ends at
    the first completed handshake, or with `wait_for_all` once every one has
    completed; at the latest after `timeout` seconds. Not sooner than
    1/_INITIATIONS_PER_SECOND after the last one completed, though: the
    cloudlet drops an initiation that follows the last one faster (a flood,
    for the kernel and wireguard-go too), and the tunnel's own comes next."""
    import select

    outcomes, peers = [None] * len(configs), {}  # socket -> (position, peer)
    last_completed = -1e9
    try:
        for position, config in enumerate(configs):
            try:
                sock = _udp_socket(None, config.endpoint)
            except TunnelError as e:
                outcomes[position] = str(e)
                continue
            try:
                peer = _Peer(private_key, config.public_key, clock=clock,
                             endpoint=_resolve_endpoint(sock, config.endpoint))
            except TunnelError as e:
                sock.close()
                outcomes[position] = str(e)
                continue
            peer.transmit = lambda message, address, sock=sock: _send_quietly(
                sock, message, address)
            peer.sender = _ProbeSender()
            peers[sock] = (position, peer)
        for _, peer in peers.values():
            peer.initiate()
        deadline = clock() + timeout
        waiting = dict(peers)
        while waiting and clock() < deadline:
            readable = select.select(list(waiting), [], [], min(0.05, deadline - clock()))[0]
            now = clock()
            for sock in readable:
                position, peer = waiting[sock]
                try:
                    datagram, address = sock.recvfrom(2048)
                except OSError:
                    continue
                peer.receive_datagram(datagram, address, now, lambda length: None)
                if peer.sender.session_keys is not None:
                    outcomes[position] = now - peer.last_initiation_sent
                    last_completed = now
                    del waiting[sock]
            if readable and len(waiting) < len(peers) and not wait_for_all:
                break
            for _, peer in waiting.values():
                peer.tick(now)  # retransmits an unanswered initiation
        first_only = len(waiting) < len(peers) and not wait_for_all
        for position, _ in waiting.values():
            outcomes[position] = ("no answer yet when the first one answered" if first_only
                                  else f"no answer within {timeout:g} s")
    finally:
        for sock in peers:
            sock.close()
    time.sleep(max(0.0, last_completed + 1 / _INITIATIONS_PER_SECOND - clock()))
    return outcomes


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
_GSO_SEGMENTS = 64  # UDP GSO: at most this many datagrams per send (Linux >= 5.0)
_GSO_BYTES = 65000  # and at most this many bytes


class _Sender:
    """Encrypts outgoing IP packets: the only user of the send keys and counters.

    Packets are read straight into `slots` (one per packet, room for the
    transport header before and the tag after), sealed in place and handed to
    `emit(views, segment_size, endpoint)` in runs of equal-sized messages,
    which is the shape UDP GSO wants. Without usable session keys packets wait
    in a short queue and `request_handshake()` asks for them.
    """

    def __init__(self, cipher, counters, emit, request_handshake, *, mtu=_DEFAULT_MTU,
                 clock=None, endpoint=None, headroom=0):
        self.cipher = cipher
        self.counters = counters
        self.emit = emit
        self.request_handshake = request_handshake
        self.clock = clock or time.monotonic
        self.mtu = mtu
        self.endpoint = endpoint
        self.session_keys = None
        self.queue = []
        self.next_request = -1e9
        self.headroom = headroom  # bytes the reader puts before each packet (vnet header)
        capacity = _TRANSPORT_HEADER_SIZE + ((mtu + 15) & ~15) + _TAG
        self.capacity = capacity
        # As many packets as fit one GSO send when they are all MTU-sized.
        self.batch = batch = min(_GSO_SEGMENTS,
                                 _GSO_BYTES // (mtu + _TRANSPORT_HEADER_SIZE + _TAG))
        self.buffer = bytearray(capacity * batch)
        view = memoryview(self.buffer)
        self.slot_views = [view[i * capacity:(i + 1) * capacity] for i in range(batch)]
        self.read_views = [
            [view[i * capacity + _TRANSPORT_HEADER_SIZE - headroom:
                  i * capacity + _TRANSPORT_HEADER_SIZE + mtu]]
            for i in range(batch)
        ]
        self.handles = [cipher.slot(self.buffer, i * capacity + _TRANSPORT_HEADER_SIZE)
                        for i in range(batch)]
        self.full_size = mtu + _TRANSPORT_HEADER_SIZE + _TAG  # the message of an MTU-sized packet
        self.full_views = [view[:self.full_size] for view in self.slot_views]

    def install(self, session_keys):
        """Use `session_keys` from now on (None: forget keys); flush what waited."""
        self.session_keys = session_keys
        if session_keys is None:
            return
        queued, self.queue = self.queue, []
        if queued:
            for packet in queued:
                self.send_packet(packet)
        elif session_keys.initiator:
            self.keepalive()  # the responder needs a first packet to confirm

    def set_endpoint(self, endpoint):
        self.endpoint = endpoint

    def drop_queue(self):
        self.queue = []

    def keepalive(self):
        """Send an empty transport message (if there are session keys to seal it)."""
        self.seal_batch([0], 1)

    def send_packet(self, packet):
        """Encrypt and send one IP packet given as bytes (slow path, tests)."""
        size = len(packet)
        self.slot_views[0][_TRANSPORT_HEADER_SIZE:_TRANSPORT_HEADER_SIZE + size] = packet
        self.seal_batch([size], 1)

    def seal_batch(self, sizes, count):
        """Encrypt and send the `count` packets read into the slots."""
        session_keys = self.session_keys
        now = self.clock()
        if (session_keys is None or self.endpoint is None
                or now - session_keys.created >= _REJECT_AFTER_TIME
                or session_keys.send_counter + count >= _REJECT_AFTER_MESSAGES):
            self._hold(sizes, count, now)
            return
        if session_keys.initiator and (now - session_keys.created >= _REKEY_AFTER_TIME
                                       or session_keys.send_counter >= _REKEY_AFTER_MESSAGES):
            self._ask_for_handshake(now)
        counters = self.counters
        if sizes[0] and not counters[_UNANSWERED_SINCE]:
            # Before sending: the answer may be back before this returns.
            counters[_UNANSWERED_SINCE] = now
        mtu, buffer, handles, seal = self.mtu, self.buffer, self.handles, self.cipher.seal
        key, index, capacity = session_keys.send_key, session_keys.remote_index, self.capacity
        slot_views, full_views, full_size = self.slot_views, self.full_views, self.full_size
        pack_header, emit, endpoint = _TRANSPORT_HEADER.pack_into, self.emit, self.endpoint
        counter = session_keys.send_counter
        views, run, limit, segment, sent, data = [], 0, 0, 0, 0, False
        for i in range(count):
            size = padded = sizes[i]
            if size & 15:
                padded = (size + 15) & ~15
                if padded > mtu:
                    padded = max(mtu, size)
                if padded != size:
                    start = i * capacity + _TRANSPORT_HEADER_SIZE
                    buffer[start + size:start + padded] = bytes(padded - size)
            if size:
                data = True
            pack_header(buffer, i * capacity, _MSG_TRANSPORT, index, counter)
            seal(key, counter, handles[i], padded)
            counter += 1
            message = padded + _TRANSPORT_HEADER_SIZE + _TAG
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
        session_keys.send_counter = counter
        counters[_TX_BYTES] += sent
        counters[_LAST_SENT] = now
        if data:
            counters[_LAST_DATA_SENT] = now

    def copies(self, sizes, count):
        """The `count` packets read into the slots, as bytes (to send later)."""
        start = _TRANSPORT_HEADER_SIZE
        return [bytes(self.slot_views[i][start:start + sizes[i]]) for i in range(count) if sizes[i]]

    def _hold(self, sizes, count, now):
        room = _QUEUED_PACKETS - len(self.queue)
        if room > 0:
            self.queue.extend(self.copies(sizes, count)[:room])
        if count:  # data or a keepalive that no usable session keys can carry
            self._ask_for_handshake(now)

    def _ask_for_handshake(self, now):
        if now >= self.next_request:
            self.next_request = now + 1.0
            self.request_handshake()




class _TunWriter:
    """Writes decrypted packets (left in `plain` by `_Peer.receive`) to the TUN.

    With a virtio_net_hdr on the device, consecutive segments of one TCP flow
    are coalesced into one GSO packet: one write instead of dozens. Any
    other packet, malformed ones included, goes out alone and unchanged.
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
        """Queue (or write) the IP packet of `length` bytes at the start of `plain`.

        `length` must be the one its IP header gives (`packet_length` makes
        sure): segments are joined up to it, not checked against it again.
        """
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
        data_offset = plain[ip_size + 12] >> 4  # 32-bit words; below 5 is malformed
        header_size = ip_size + data_offset * 4
        payload = length - header_size
        if payload <= 0 or data_offset < 5 or plain[ip_size + 13] != _TCP_ACK:
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
    """The control process's handle on the `_Sender` in the sending process.

    Each message is counted in `counters` once it is on its way, which lets
    the sending process know whether news is waiting for it (`_send_loop`).
    """

    def __init__(self, sock, endpoint_area, counters):
        self.sock = sock
        self.endpoint_area = endpoint_area
        self.counters = counters

    def install(self, session_keys):
        """Only the sending half goes: the receiving key stays in this process."""
        sending_half = None
        if session_keys is not None:
            sending_half = (session_keys.send_key, session_keys.local_index,
                            session_keys.remote_index, session_keys.created,
                            session_keys.initiator)
        self._send(("install", sending_half))

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
        self.counters[_CONTROL_MESSAGES] += 1


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
    receiving process is gone.

    Packets read from the TUN are sealed only after every message the control
    process had sent by then is applied. The control process sends new
    session keys or a new endpoint before it writes the packet that brought
    them to the TUN, so an answer to that packet (which exists only after the
    write) never leaves under session keys the peer has abandoned, or for its
    old address, however the scheduler orders the two processes.
    """
    import select

    poller = select.poll()
    link_fd = link.fileno()
    for fd in (tun_fd, link_fd):
        poller.register(fd, select.POLLIN)
    batch = sender.batch
    sizes = [0] * batch
    read_views = sender.read_views
    readv, seal_batch, counters = os.readv, sender.seal_batch, sender.counters
    headroom = _VNET_HEADER_SIZE if vnet_hdr else 0
    applied = 0.0  # control messages sent before the last time the link was drained
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
                    if not count:
                        break
                    if counters[_CONTROL_MESSAGES] == applied:
                        seal_batch(sizes, count)
                        continue
                    # News came before some of these were read, and they may
                    # answer the packet that brought it: apply it first. The
                    # slots are copied, since a keepalive or a flush reuses them.
                    packets = sender.copies(sizes, count)
                    applied = counters[_CONTROL_MESSAGES]
                    if not _apply_control_messages(sender, link):
                        return
                    for packet in packets:
                        sender.send_packet(packet)
            elif fd == link_fd:
                applied = counters[_CONTROL_MESSAGES]
                if not _apply_control_messages(sender, link):
                    return


def _apply_control_messages(sender, link):
    """Carry out, in order, every message waiting from the control process;
    False when that process is gone."""
    import pickle
    import socket

    while True:
        try:
            message = link.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        if not message:
            return False
        message = pickle.loads(message)
        if message[0] == "install":
            session_keys = None
            if message[1] is not None:
                send_key, local_index, remote_index, created, initiator = message[1]
                session_keys = _SessionKeys(send_key, None, local_index, remote_index,
                                            created, initiator)
            sender.install(session_keys)
        elif message[0] == "endpoint":
            sender.set_endpoint(message[1])
        elif message[0] == "keepalive":
            sender.keepalive()
        elif message[0] == "drop_queue":
            sender.drop_queue()


class _NoHandshakeError(TunnelError):
    """The peer never completed a handshake: it is silent, or not WireGuard."""


class _WorkerEndedError(TunnelError):
    """A datapath worker process is gone: the datapath needs new ones."""


# When a running tunnel counts as lost (see `Datapath.trouble`). A peer that
# is there answers data within KEEPALIVE_TIMEOUT (with data, or a passive
# keepalive), and WireGuard itself starts a new handshake after
# KEEPALIVE_TIMEOUT + REKEY_TIMEOUT without an answer; a handshake is
# retransmitted every REKEY_TIMEOUT, so two unanswered ones mean more than
# one lost datagram.
_DATA_LOST_AFTER = _KEEPALIVE_TIMEOUT + _REKEY_TIMEOUT
_HANDSHAKE_LOST_AFTER = 2 * _REKEY_TIMEOUT


class Datapath:
    """Userspace WireGuard between a TUN file descriptor and a UDP socket.

    One peer. The socket is bound at construction (`listen_port`); `listen`
    is (host, port), by default the wildcard of the endpoint's family, or
    dual-stack IPv6 without an endpoint. The wildcard lets the kernel pick
    the source address of each datagram, so the tunnel follows the caller's
    network when its address or route changes (roaming). `endpoint` is
    (host, port), host a name or an IPv4 or IPv6 literal; without one this
    side waits for the peer (responder). `mtu` is the TUN device's.
    `start()` forks two worker processes that share the keys: one encrypts
    TUN -> UDP, the other decrypts UDP -> TUN and runs handshakes and timers;
    this object only watches them through shared memory
    (`wait_for_handshake`, `trouble`, `stats`), starts them again for a
    changed peer (`restart`) and ends them (`stop`).
    """

    def __init__(self, tun_fd, private_key, peer_public_key, *, endpoint=None,
                 allowed_ips=(), preshared_key=None, persistent_keepalive=0,
                 listen=None, vnet_hdr=False, mtu=_DEFAULT_MTU, clock=None):
        import mmap

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
        self._private_key = private_key
        self._preshared_key = preshared_key
        self._persistent_keepalive = persistent_keepalive
        self._listen = listen
        self._shared = mmap.mmap(-1, 8 * _COUNTERS + 256)
        self._endpoint_area = memoryview(self._shared)[8 * _COUNTERS:]
        self._workers = []
        self._ended = None  # how the last worker to end did
        self._socket = None
        self._bind(peer_public_key, endpoint, allowed_ips)

    def _bind(self, peer_public_key, endpoint, allowed_ips):
        """A new peer (no session keys, counters reset) and a new UDP socket,
        `endpoint`'s name resolved again."""
        self._counters = _shared_counters(self._shared)
        self._peer = _Peer(self._private_key, peer_public_key,
                           preshared_key=self._preshared_key, allowed_ips=allowed_ips,
                           persistent_keepalive=self._persistent_keepalive,
                           clock=self._clock, counters=self._counters)
        self._socket = sock = _udp_socket(self._listen, endpoint)
        self.listen_port = sock.getsockname()[1]
        try:
            self._endpoint = _resolve_endpoint(sock, endpoint) if endpoint else None
        except TunnelError:
            sock.close()
            self._socket = None
            raise
        self._endpoint_name = endpoint
        self._allowed_ips = allowed_ips
        self._peer.endpoint = self._endpoint
        _store_endpoint(self._endpoint_area, self._endpoint)
        self._gso = _try_setsockopt(sock, _SOL_UDP, _UDP_SEGMENT, 0)
        self._gro = _try_setsockopt(sock, _SOL_UDP, _UDP_GRO, 1)

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
        peer.sender = _SenderLink(control, self._endpoint_area, self._counters)
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

    def restart(self, peer_public_key=None, endpoint=None, allowed_ips=None):
        """Start over with new workers and a new handshake, for the peer's
        new key, endpoint or allowed IPs (None: as before); the endpoint's
        name is resolved again. The TUN device stays, and with it what the
        application has open. The socket address the endpoint resolved to."""
        self._stop_workers()
        if self._socket is not None:
            self._socket.close()  # the listen port may be fixed: free it first
            self._socket = None
        self._bind(peer_public_key or self._peer.peer_public_key,
                   endpoint or self._endpoint_name,
                   self._allowed_ips if allowed_ips is None else allowed_ips)
        self.start()
        return self._endpoint

    def wait_for_handshake(self, timeout):
        """Return once a handshake has completed; TunnelError after `timeout` s,
        or sooner when the peer stayed silent for the whole REKEY_ATTEMPT_TIME."""
        counters = self._counters
        deadline = time.monotonic() + timeout
        while not counters[_LAST_HANDSHAKE_WALL]:
            if not self._workers or not self._running():
                raise TunnelError("the WireGuard datapath is not running")
            if counters[_HANDSHAKES_ABANDONED]:
                raise _NoHandshakeError(f"no WireGuard handshake with the peer: no answer "
                                        f"to {_REKEY_ATTEMPT_TIME:g} s of initiations")
            if time.monotonic() >= deadline:
                raise _NoHandshakeError(
                    f"no WireGuard handshake with the peer within {timeout:g} s")
            time.sleep(0.01)

    def handshake_done(self):
        """Whether a handshake has completed since the last (re)start."""
        return bool(self._counters[_LAST_HANDSHAKE_WALL])

    def trouble(self):
        """Why the tunnel looks lost, or None while the peer answers: a
        worker ended (`_WorkerEndedError`), a handshake went unanswered for
        _HANDSHAKE_LOST_AFTER s, or data for _DATA_LOST_AFTER s (a
        `TunnelError`, not raised)."""
        if not self._running():
            return _WorkerEndedError(
                f"a WireGuard datapath worker ended ({self._ended})" if self._ended
                else "the WireGuard datapath is not running")
        counters, now = self._counters, self._clock()
        pending = counters[_HANDSHAKE_PENDING_SINCE]
        if pending and now - pending >= _HANDSHAKE_LOST_AFTER:
            return TunnelError(f"no answer to WireGuard handshakes for {now - pending:.0f} s")
        unanswered = counters[_UNANSWERED_SINCE]
        if unanswered and now - unanswered >= _DATA_LOST_AFTER:
            return TunnelError(f"no answer to data for {now - unanswered:.0f} s")
        return None

    def _running(self):
        """Whether both workers are alive (one that ended is reaped, and
        how it ended kept in `_ended`)."""
        for pid in list(self._workers):
            try:
                ended, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                ended, status = pid, 0
            if ended:
                self._workers.remove(pid)
                code = os.waitstatus_to_exitcode(status)
                if self._ended is None or code:  # the other follows it out cleanly
                    self._ended = (f"killed by signal {-code}" if code < 0
                                   else f"exit status {code}")
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

    def _stop_workers(self):
        import signal

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
        self._ended = None

    def stop(self):
        """End the workers and close the socket; safe to call more than once."""
        self._stop_workers()
        if self._socket is not None:
            self._socket.close()
            self._socket = None


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
#
# The application runs in a tree of processes forked from the tool:
#
#   tool (caller's namespaces: datapath, Tier 1)
#    `- holder: unshares user+net+mount+PID namespaces, sets up the network
#        |      and resolv.conf, then execs a minimal Python that waits for init
#        `- init: PID 1 of the new PID namespace; mounts /proc, reaps orphans,
#            |    passes signals on
#            `- application (exec'd as the caller, with no capability left)
#
# Tool and namespace talk over a SOCK_SEQPACKET pair: JSON messages, and the
# TUN descriptor as SCM_RIGHTS. Each child dies with its parent
# (PR_SET_PDEATHSIG), and everything in a PID namespace dies with its init,
# so nothing outlives the tool. The holder is forked early and prepares what it
# can (namespaces, pyroute2, the interface) while the tool is still talking to
# Tier 1; the addresses, routes and command follow when they are known.

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_SECBIT_NOROOT, _SECBIT_NOROOT_LOCKED = 0x1, 0x2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
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
_DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds for the first handshake
_SETUP_TIMEOUT = 30.0
_DEFAULT_READY_TIMEOUT = 120.0  # seconds for --wait-for; a pod may take minutes after a reboot
_READY_REPORT_INTERVAL = 3.0  # seconds between "waiting for" lines
_READY_RETRY_INTERVAL = 0.25
_READY_CONNECT_TIMEOUT = 2.0  # per attempt, for an address that drops SYNs
_MAX_MESSAGE = 1 << 20
_TICK = 0.2  # seconds between looks at the tunnel while the application runs
_MAX_FDS = 253  # SCM_MAX_FD: the most descriptors one message carries


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
    """One end of the conversation between the tool and the holder:
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
        try:
            data, fds, _, _ = socket.recv_fds(self._sock, _MAX_MESSAGE, _MAX_FDS)
        except ConnectionResetError:
            # The other side closed with messages of ours unread; the kernel
            # says so first, then hands over what it had sent (its last words).
            data, fds, _, _ = socket.recv_fds(self._sock, _MAX_MESSAGE, _MAX_FDS)
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
    """Unshare network, mount (all private) and PID namespaces, and for any caller but root a
    user namespace mapping the caller's own uid and gid. Its capabilities there
    last until exec, where the non-root uid loses them. (Root needs no user
    namespace and keeps being root, as with `ip netns exec`.)"""
    uid, gid = os.geteuid(), os.getegid()
    flags = _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID
    try:
        if uid == 0:
            _unshare(flags)
        else:
            _unshare(flags | _CLONE_NEWUSER)
            for name, text in [("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                               ("gid_map", f"{gid} {gid} 1")]:
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
    except OSError as e:
        if uid == 0:
            raise TunnelError(f"cannot create the application's namespaces: "
                              f"{e.strerror}") from None
        raise TunnelError(_explain_userns_failure(e)) from None
    try:
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # no mount of ours leaks out
    except OSError as e:
        raise TunnelError(f"cannot make the application's mounts private: {e.strerror}") \
            from None


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
        """In the holder: make the device; its descriptor is what
        goes to the tool with the {"interface": name} message."""
        try:
            return [_open_tun(self.name)]
        except TunnelError as e:
            raise TunnelError(f"{e}: {_tun_advice()}") from None


class _LinkMovedIn:
    """Interface made outside and moved in by the tool (the kernel backend):
    the holder says {"awaiting_link": name}; the tool moves the link into the
    network namespace of `_Namespace.pid` and answers {"link_moved": name};
    then, as with a TUN device, {"interface": name} says it is there (and
    {"configured"} that it is up)."""

    def __init__(self, name):
        self.name = name

    def create(self, channel):
        channel.send({"awaiting_link": self.name})
        _iproute_class()  # loads while the tool makes the link

        message, _ = channel.receive()
        if message != {"link_moved": self.name}:
            raise TunnelError(f"the tunnel link {self.name} was not moved in")
        return []


def _iproute_class():
    """pyroute2's IPRoute, with as little of pyroute2 loaded as will do.

    The package's __init__ imports the whole library (NDB, IPDB, conntrack,
    ...), which takes as long again as IPRoute's own modules, on the path to
    the application's start. In the holder, which needs nothing
    else, the package is registered without running it (unless the tool had
    loaded it before the fork), and only IPRoute's modules load.
    """
    if "pyroute2" not in sys.modules:
        import importlib.util

        spec = importlib.util.find_spec("pyroute2")
        if spec is not None:
            sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
            try:
                from pyroute2.iproute.linux import IPRoute

                return IPRoute
            except (ImportError, AttributeError):  # a release whose modules need its __init__
                for name in [n for n in sys.modules if n.partition(".")[0] == "pyroute2"]:
                    del sys.modules[name]
    from pyroute2.iproute.linux import IPRoute

    return IPRoute


def _netlink_step(what, function, *args, **kwargs):
    """Run one pyroute2 request; a refusal becomes a TunnelError naming `what`."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return function(*args, **kwargs)
    except NetlinkError as e:
        raise TunnelError(f"cannot {what}: {os.strerror(e.code)}") from None


def _configure_interface(ipr, index, name, addresses, routes):
    """Addresses and routes on the tunnel interface, which is up already."""
    import ipaddress

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
    names. When that file is missing (it was in a hidden directory, or its
    service is not running), it is created on the tmpfs over its directory:
    one of `hidden_dirs`, or a new one if the directory is under /run. The
    file comes from a tmpfs mounted briefly on `staging`: the bind mount keeps
    it alive after the staging mount is gone, so nothing is written to disk.
    """
    hidden = []
    for directory in hidden_dirs:
        if os.path.isdir(directory):
            _hide_path(directory)
            hidden.append(os.path.realpath(directory))
    target = os.path.realpath(path)
    if not os.path.exists(target):
        directory = os.path.dirname(target)
        if directory not in hidden:
            if not (directory.startswith("/run/") and os.path.isdir(directory)):
                raise TunnelError(
                    f"{path} is missing or leads nowhere ({target}), so the "
                    "cloudlet's DNS cannot be put there: create it (an empty file "
                    "will do)")
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


def _set_up_network(channel, interface, mtu):
    """In the new namespaces, as the tool asks: the interface, its addresses
    and routes, resolv.conf, and the relay of the forwards when asked for
    (its channel goes with {"configured"}). False when the tool gave up."""
    # The interface goes to the tool before pyroute2 is loaded (the longest
    # step here), so that the tool sets up its datapath meanwhile.
    fds = interface.create(channel)
    channel.send({"interface": interface.name}, fds=fds)
    for fd in fds:
        os.close(fd)
    IPRoute = _iproute_class()
    with IPRoute() as ipr:
        _netlink_step("bring up lo", ipr.link, "set", index=1, state="up")
        index = ipr.link_lookup(ifname=interface.name)[0]
        _netlink_step(f"set MTU {mtu} on {interface.name}", ipr.link, "set",
                      index=index, mtu=mtu)
        _netlink_step(f"bring up {interface.name}", ipr.link, "set", index=index,
                      state="up")
        config, _ = channel.receive()
        if config is None:
            return False
        _configure_interface(ipr, index, interface.name, config["addresses"],
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
    relay = [_fork_relay()] if config.get("relay") else []
    channel.send({"configured": True}, fds=[end.fileno() for end in relay])
    for end in relay:
        end.close()
    return True


def _reconfigure_interface(ipr, name, old, new):
    """Move the running interface `name` from the `old` addresses and routes
    ({"addresses": [...], "routes": [...]}) to the `new` ones."""
    import ipaddress

    from pyroute2.netlink.exceptions import NetlinkError

    index = ipr.link_lookup(ifname=name)[0]
    for text in set(old["addresses"]) - set(new["addresses"]):
        address = ipaddress.ip_interface(text)
        _netlink_step(f"remove address {address} from {name}", ipr.addr, "del", index=index,
                      address=str(address.ip), prefixlen=address.network.prefixlen)
    for text in set(old["routes"]) - set(new["routes"]):
        try:
            ipr.route("del", dst=str(ipaddress.ip_network(text)), oif=index)
        except NetlinkError:
            pass  # gone with its address already
    _configure_interface(ipr, index, name,
                         [a for a in new["addresses"] if a not in old["addresses"]],
                         new["routes"])


def _reconfigure_network(request):
    """In the namespace's init, for a running session: the interface's new
    addresses and routes, the new resolv.conf text written over the one in
    place (or placed now, when the host's was kept so far). None when done,
    else the one line saying what failed."""
    try:
        if request["old"] != request["new"]:
            with _iproute_class()() as ipr:
                _reconfigure_interface(ipr, request["interface"], request["old"],
                                       request["new"])
        text = request["resolv_conf"]
        if text is not None:
            try:
                if request["resolv_conf_placed"]:
                    with open(_RESOLV_CONF, "w") as f:  # the file bind-mounted there
                        f.write(text)
                else:
                    _place_resolv_conf(text)
            except OSError as e:
                raise TunnelError(f"cannot put the cloudlet's DNS in {_RESOLV_CONF}: {e}") \
                    from None
    except TunnelError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - the tool says it in one line
        return f"{type(e).__name__}: {e}"
    return None


def _namespace_init(channel, network_ready):
    """PID 1 of the new PID namespace: once the network is set up (EOF on
    `network_ready`), a fresh /proc and the application; serves as its init.
    Returns the application's status."""
    # Until then the channel is the other process's, and /proc stays as it
    # is: the new one has no /proc/self for a process outside the namespace.
    os.read(network_ready, 1)
    os.close(network_ready)
    try:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError as e:
        raise TunnelError(
            f"cannot mount /proc for the application's PID namespace: {e.strerror} "
            "(a container that hides parts of /proc forbids it; run on the host)"
        ) from None
    start, fds = channel.receive()
    if start is not None and "wait_for" in start:
        _wait_for_services(channel, start["wait_for"])
        start, fds = channel.receive()
    if start is None:  # the tool gave up
        return 125
    joined = None
    if fds:  # the session's socket: later invocations join through it
        import socket

        joined = _JoinedCommands(socket.socket(fileno=fds[0]), start["join_env"])
    return _serve_as_init(channel, start, joined)


def _wait_for_services(channel, targets):
    """In init, before the application: connect to each [host, port] of
    `targets` (the name resolved through the namespace's resolv.conf) until
    it accepts, telling the tool what is still awaited and why, at once and
    then every few seconds ({"waiting": "host:port", "why": ...}), and
    {"ready": true} at the end. The tool keeps the time: it ends the
    namespace when there is none left."""
    next_report = time.monotonic()
    for host, port in targets:
        while True:
            why = _connect_refusal(host, port)
            if why is None:
                break
            if time.monotonic() >= next_report:
                channel.send({"waiting": str(_Endpoint(host, port)), "why": why})
                next_report = time.monotonic() + _READY_REPORT_INTERVAL
            time.sleep(_READY_RETRY_INTERVAL)
    channel.send({"ready": True})


def _connect_refusal(host, port):
    """Why a TCP connection to `host`:`port` cannot be made now; None once one was."""
    import socket

    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot resolve {host}: {e.strerror}"
    why = f"{host} has no address"
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as sock:
            sock.settimeout(_READY_CONNECT_TIMEOUT)
            try:
                sock.connect(address)
                return None
            except OSError as e:
                why = e.strerror or str(e)
    return why


def _serve_as_init(channel, start, joined=None):
    """Start the application (none for forwards alone: `start`'s command is
    None), then do init's job until it ends, and the `joined` commands too:
    reap every orphan, pass on the signals the tool forwards (to the joined
    commands once the application has ended), tell the tool when the
    application stops (Ctrl-Z) and continue it when told. Returns the
    application's status; the rest of the PID namespace dies then."""
    import select
    import signal

    wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # to hand the terminal over
    application = None if start["command"] is None else os.fork()
    if application == 0:
        _exec_application(channel, start["command"], start["env"], start["terminal"])
    import gc

    gc.enable()  # off since the fork from the tool
    status = None  # the application's, once it has ended
    while status is None or (joined and joined.running()):
        waited = [channel, wakeup_r, *(joined.descriptors() if joined else ())]
        readable, _, _ = select.select(waited, [], [])
        if channel in readable:
            message, _ = channel.receive()
            if message is None:  # the tool is gone: so is everything here
                return 125
            if "reconfigure" in message:
                channel.send({"reconfigured": _reconfigure_network(message["reconfigure"])})
                continue
            try:
                if "continue" in message:  # the terminal to take, or None
                    if message["continue"] is not None:
                        os.tcsetpgrp(message["continue"], application)
                    os.killpg(application, signal.SIGCONT)
                elif status is None and application is not None:
                    os.kill(application, message["signal"])
                elif joined:
                    joined.signal_all(message["signal"])
            except ProcessLookupError:
                pass
        if joined:
            joined.serve(readable)
        if wakeup_r in readable:
            os.read(wakeup_r, 4096)
            while True:
                try:
                    pid, wait_status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid == application:
                    if os.WIFSTOPPED(wait_status):
                        channel.send({"stopped": os.WSTOPSIG(wait_status)})
                        continue
                    status = _exit_status(wait_status)
                    if joined and joined.running():
                        channel.send({"lasting": joined.running()})
                elif joined and not os.WIFSTOPPED(wait_status):
                    joined.ended(pid, wait_status)
    return status


def _peer_uid(sock):
    """The user id of the process at the other end of Unix socket `sock`."""
    import socket

    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                  struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


class _JoinedCommands:
    """Init's side of joining a running session: the commands that later
    invocations of the tool for the same backend run here, each asked for
    over a connection to the session's socket (`_SessionSocket`).

    A request is {"join": {"command": [...], "env": {...}, "cwd": path,
    "terminal": bool}} with the joiner's stdin, stdout and stderr as
    descriptors (with "terminal", a pseudo-terminal that becomes the
    command's controlling terminal: `_PseudoTerminal`); the answer
    {"joined": true} once the command runs, then {"ended": status}.
    Meanwhile the joiner may send {"signal": N} for its command; a joiner
    that goes away (or says anything else) takes its command's process
    group with it. Nothing a joiner sends, however wrong, disturbs the rest
    of the session."""

    def __init__(self, listener, env_extra):
        self._listener = listener
        self._env_extra = env_extra
        self._waiting = []   # connections whose request has not come yet
        self._commands = {}  # pid -> the connection of its joiner (None: gone)

    def running(self):
        return len(self._commands)

    def descriptors(self):
        return [self._listener, *self._waiting,
                *(c for c in self._commands.values() if c is not None)]

    def serve(self, readable):
        """Take new connections, start what they ask, pass their signals on."""
        # In this order: each step only reads what select found readable
        # before the step before it added to what it looks at.
        for pid, connection in list(self._commands.items()):
            if connection is None or connection not in readable:
                continue
            try:
                message, _ = connection.receive()
                signum = message["signal"]
                if type(signum) is not int:
                    raise TypeError(signum)
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
            except Exception:  # noqa: BLE001 - its joiner is gone, or talks nonsense
                self._abandon(pid)
        for connection in [c for c in self._waiting if c in readable]:
            self._waiting.remove(connection)
            self._start(connection)
        if self._listener in readable:
            self._accept()

    def _accept(self):
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        if _peer_uid(sock) != os.geteuid():
            sock.close()  # only the session's own user may join it
            return
        self._waiting.append(_Channel(sock))

    def _start(self, connection):
        fds = []
        try:
            message, fds = connection.receive()
            if message is None:  # a look, not a request (--json asking if we run)
                raise ValueError("no request")
            command, env, cwd, terminal = _join_request(message, fds)
            command, env = _application_command(command, env, self._env_extra)
            pid = os.fork()
            if pid == 0:
                _exec_application(_ErrorsToStderr(), command, env, 0 if terminal else None,
                                  joined=fds, cwd=cwd)
        except Exception:  # noqa: BLE001 - no request, however wrong, ends the session
            connection.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        self._commands[pid] = connection
        try:
            connection.send({"joined": True})
        except OSError:
            self._abandon(pid)

    def _abandon(self, pid):
        """The joiner of `pid` is gone: end its command (and its process group)."""
        for kill in (os.kill, os.killpg):  # the group may not be made yet
            try:
                kill(pid, 9)
            except ProcessLookupError:
                pass
        self._commands[pid].close()
        self._commands[pid] = None  # until reaped

    def ended(self, pid, wait_status):
        """Tell the joiner of `pid` how its command ended."""
        if pid not in self._commands:
            return  # an orphan, reaped as init does
        connection = self._commands.pop(pid)
        if connection is None:
            return
        try:
            connection.send({"ended": _exit_status(wait_status)})
        except OSError:
            pass
        connection.close()

    def signal_all(self, signum):
        for pid in self._commands:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _join_request(message, fds):
    """(command, environment, directory, terminal) of a join request,
    checked to be what `_SessionSocket` sends: ValueError or TypeError if not."""
    request = message["join"]
    command, env, cwd = request["command"], request["env"], request["cwd"]
    terminal = request["terminal"]
    if len(fds) != 3:
        raise ValueError("expected stdin, stdout and stderr")
    if type(command) is not list or not all(type(word) is str for word in command):
        raise TypeError("command")
    if type(env) is not dict or not all(type(v) is str for v in env.values()):
        raise TypeError("env")
    if type(cwd) is not str or type(terminal) is not bool:
        raise TypeError("cwd or terminal")
    return command, env, cwd, terminal


class _ErrorsToStderr:
    """Where a joined command's process reports that it could not start:
    its own stderr, the joiner's, as the one line the tool prints."""

    def send(self, message):
        os.write(2, f"sinfonia-tier3: {message['error']}\n".encode())


def _drop_capabilities():
    """Leave the application no capability, now or after any exec: none
    effective, permitted, inheritable or ambient, an empty bounding set, uid 0
    no longer special (SECBIT_NOROOT, locked) and no_new_privs. A user's
    application would lose its user namespace's capabilities at exec anyway;
    root's, which has no user namespace, would otherwise keep all of them and
    could leave its network namespace (by unmounting its /proc, say)."""
    import ctypes

    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for capability in range(last + 1):
        _libc_call("prctl", _PR_CAPBSET_DROP, capability, 0, 0, 0)
    _libc_call("prctl", _PR_SET_SECUREBITS, _SECBIT_NOROOT | _SECBIT_NOROOT_LOCKED,
               0, 0, 0)
    _libc_call("prctl", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _libc_call("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    header = struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    _libc_call("capset", ctypes.c_char_p(header), ctypes.create_string_buffer(24))


def _exec_application(channel, command, env, terminal, joined=None, cwd=None):
    """In the application's own process: take the terminal when the tool had
    it, restore default signal handling, exec. Never returns.

    A `joined` command (a later invocation's, `_JoinedCommands`) gets the
    descriptors its joiner sent instead (stdin, stdout, stderr), the
    joiner's directory `cwd`, and a session of its own, away from the first
    invocation's terminal; its controlling terminal is `terminal` then, the
    joiner's pseudo-terminal on stdin, if any."""
    import signal

    status = 126
    try:
        if joined is None:
            os.setpgid(0, 0)
        else:
            for target, fd in enumerate(joined):
                os.dup2(fd, target)
            for fd in joined:
                if fd > 2:
                    os.close(fd)
            os.setsid()
            if terminal is not None:  # the joiner's pseudo-terminal: ours to control
                import termios

                fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)
            try:
                os.chdir(cwd)
            except OSError as e:
                raise TunnelError(f"cannot enter {cwd}: {e.strerror}") from None
        if terminal is not None:
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(terminal, os.getpgrp())
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTTOU, signal.SIGPIPE, signal.SIGXFSZ,
                       signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        name = command[0]
        program = _find_program(name, env.get("PATH", os.defpath))
        if program is None:
            status, message = 127, f"{name}: command not found"
        else:
            try:
                _drop_capabilities()
            except OSError as e:
                raise TunnelError(f"cannot drop the application's capabilities: "
                                  f"{e.strerror}") from None
            try:
                os.execve(program, command, env)
            except (FileNotFoundError, NotADirectoryError):
                status, message = 127, f"{name}: no such file"
            except OSError as e:
                message = f"{name}: cannot execute: {e.strerror}"
        channel.send({"error": message, "status": status})
    except BaseException as e:  # noqa: BLE001 - the parent prints it as one line
        status = 125
        _report_failure(channel, e)
    finally:
        os._exit(status)


def _find_program(name, path):
    """What the shell would run for `name`: a path as given, else the first
    executable file of that name on `path`, else the first file of that name
    (exec then says why not: 126); None when there is none at all (127)."""
    if "/" in name:
        return name
    found = None
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            found = found or candidate
    return found


def _report_failure(channel, error):
    """Tell the tool, in one line, why the holder gives up."""
    if isinstance(error, SinfoniaError):
        message = str(error)
    else:
        message = f"the application's namespace failed: {type(error).__name__}: {error}"
    try:
        channel.send({"error": message})
    except OSError:
        pass


def _close_private_descriptors(keep):
    """Close the tool's own descriptors (its sockets, other sessions' TUN
    devices), which exec would close anyway; those the caller passed on to
    the application (inheritable ones) stay."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                if not os.get_inheritable(fd):
                    os.close(fd)
            except OSError:  # the directory's own descriptor, closed already
                pass


# What the holder becomes once the network is set up: a fresh,
# minimal interpreter that only waits for init, so that neither pyroute2 nor
# the copy of the tool's heap stays in memory for the whole session. Its
# other child, the relay of the forwards, is reaped too: it is in init's PID
# namespace, and init's exit waits until every process there has been.
_INIT_WAITER = """\
import os, sys
pid = None
while pid != int(sys.argv[1]):
    pid, status = os.wait()
status = os.waitstatus_to_exitcode(status)
os._exit(status if status >= 0 else 128 - status)
"""


def _run_holder(channel, parent_pid, interface, mtu):
    """The holder, forked by `_Namespace`: enters the new namespaces, forks
    their init, sets up the network meanwhile, then waits for init and exits
    with its status. Never returns."""
    status = 125
    try:
        _die_with_parent(parent_pid)
        import gc

        gc.freeze()  # the tool's objects (whose descriptors go next) are never finalized here
        gc.disable()  # until the application runs: pyroute2 then loads ~8% faster
        _close_private_descriptors(keep=channel.fileno())
        os.setpgid(0, 0)  # out of the terminal's way: its signals go to the tool
        _enter_new_namespaces()
        network_ready, network_done = os.pipe()  # both close on exec
        init = os.fork()
        if init == 0:
            _die_with_parent(None)  # this process is outside the new PID namespace
            os.close(network_done)
            status = _namespace_init(channel, network_ready)
        else:
            os.close(network_ready)
            if _set_up_network(channel, interface, mtu):
                channel.close()
                _become_init_waiter(init)
                os.close(network_done)
                status = _wait_for_init(init)
    except BaseException as e:  # noqa: BLE001 - the parent prints it as one line
        _report_failure(channel, e)
    finally:
        os._exit(status)


def _wait_for_init(init):
    """What `_INIT_WAITER` does, where it cannot be exec'd: init's status."""
    pid = None
    while pid != init:
        pid, status = os.wait()
    return _exit_status(status)


def _become_init_waiter(init):
    """Exec `_INIT_WAITER` for `init`, when this is a Python interpreter that
    can run it (an application embedding Python may not be); else return."""
    if os.path.basename(sys.executable).startswith(("python", "pypy")):
        try:
            os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", _INIT_WAITER,
                                      str(init)])
        except OSError:
            pass


def _foreground_terminal():
    """Our controlling terminal's descriptor when we are its foreground job."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return fd
        except OSError:
            pass
    return None


def _application_command(command, environ, env_extra):
    """(command, environment) of an application: `command`, or for none the
    user's shell, prompting `sinfonia$ `; `environ` plus `env_extra`."""
    env = dict(environ)
    env.update(env_extra)
    if not command:
        command = [env.get("SHELL") or "/bin/sh"]
        env["PS1"] = _SHELL_PROMPT
        # bash sets PS1 in its rc files; this sets it back each time
        env["PROMPT_COMMAND"] = f"PS1='{_SHELL_PROMPT}'"
    return command, env


class _Namespace:
    """The application's namespaces, kept by the holder, a child forked at
    construction.

    `interface` says how the tunnel interface gets in (`_TunInside` or
    `_LinkMovedIn`); with `relay`, the namespace gets a relay for forwards
    (its `_Channel` is `relay` once configured). Then: `receive_interface()`,
    `configure()` it, `run()`
    the application (or `start()` it and `wait()` for its exit status);
    `close()` (or leaving the `with` block) kills whatever is left.
    """

    def __init__(self, interface, *, mtu=_DEFAULT_MTU, relay=False):
        self._channel, holder_end = _Channel.pair()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._channel.close()
            _run_holder(holder_end, parent, interface, mtu)
        holder_end.close()
        self.forked = time.monotonic()
        self.pid = pid
        self.interface = interface
        self._relay_wanted = relay
        self.relay = None
        self._status = None
        self._terminal = None
        self._handlers = {}  # signal -> the tool's handler, while forwarding

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def send(self, message, fds=()):
        try:
            self._channel.send(message, fds)
        except (BrokenPipeError, ConnectionResetError):  # its last message says why
            self.expect("error")
        except OSError as e:  # e.g. an environment too large for one message
            raise TunnelError(f"cannot pass the application's settings to its "
                              f"namespace: {e.strerror}") from None

    def expect(self, key, timeout=_SETUP_TIMEOUT):
        """The holder's next message, which must carry `key`: (message, fds).
        The holder's own failures arrive as its one-line TunnelError."""
        import socket

        try:
            message, fds = self._next_message(timeout)
        except socket.timeout:
            raise TunnelError(
                f"the application's namespace was not ready within {timeout:g} s "
                "(the machine may be overloaded)") from None
        if key not in message:
            raise TunnelError(f"the application's namespace said {message!r}, "
                              f"not {key!r}")
        return message, fds

    def _next_message(self, timeout):
        """(message, fds) of the holder's next message, its failures raised as
        their TunnelError; socket.timeout when none came within `timeout`."""
        message, fds = self._channel.receive(timeout)
        if message is None:
            status = self._reap()
            raise TunnelError(f"the application's namespace ended unexpectedly "
                              f"(status {status})")
        if "error" in message:
            self._reap()
            raise TunnelError(message["error"])
        return message, fds

    def wait_for(self, targets, timeout, debug=False):
        """Hold the application until each (host, port) of `targets` accepts a
        TCP connection from inside the namespace, its name resolved by the
        cloudlet's DNS; a line on stderr every few seconds meanwhile, and
        NotReadyError naming what did not answer after `timeout` seconds."""
        import socket

        if not targets:
            return
        self.send({"wait_for": [[host, port] for host, port in targets]})
        started = time.monotonic()
        awaited, why = ", ".join(str(_Endpoint(*target)) for target in targets), None
        while True:
            left = started + timeout - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout
                message, _ = self._next_message(left)
            except socket.timeout:
                raise NotReadyError(
                    f"the backend did not answer at {awaited} within {timeout:g} s"
                    + (f" ({why})" if why else "") + ", so the application was not "
                    "started: allow more time with --ready-timeout") from None
            elapsed = time.monotonic() - started
            if "ready" in message:
                if debug:
                    _debug(f"the backend answered after {elapsed:.1f} s")
                return
            if "waiting" not in message:
                raise TunnelError(f"the application's namespace said {message!r}, "
                                  "not how its backend is")
            awaited, why = (_printable(message["waiting"], 80),
                            _printable(message.get("why", ""), 80))
            if elapsed >= 1:
                print(f"sinfonia-tier3: waiting for {awaited} ... {elapsed:.0f} s ({why})",
                      file=sys.stderr)

    def receive_interface(self, move_link=None):
        """The tunnel interface, once it is in the namespace: the descriptors
        that came with it (the caller's to close). A link made outside is
        moved in by `move_link(pid)` when the holder asks for it. The
        interface never arriving is an `_InterfaceFailedError`."""
        if move_link is not None:
            self.expect("awaiting_link")
            move_link(self.pid)
            self.send({"link_moved": self.interface.name})
        try:
            return self.expect("interface")[1]
        except TunnelError as e:
            raise _InterfaceFailedError(str(e)) from None

    def configure(self, addresses, routes, resolv_conf, meanwhile=None):
        """Give the interface its addresses and routes (networks) and the
        namespace the resolv.conf text (None: keep the host's); returns once
        they are in place, having run `meanwhile()` while the holder works."""
        self.network = {"addresses": [str(address) for address in addresses],
                        "routes": [str(route) for route in routes]}
        self.resolv_conf = resolv_conf
        self.send(dict(self.network, resolv_conf=resolv_conf, relay=self._relay_wanted))
        if meanwhile is not None:
            meanwhile()
        _, fds = self.expect("configured")
        if self._relay_wanted:
            import socket

            if len(fds) != 1:
                raise TunnelError("the application's namespace sent no relay for the forwards")
            self.relay = _Channel(socket.socket(fileno=fds[0]))

    @property
    def channel(self):
        """The channel to the holder, for a loop that waits on it and others."""
        return self._channel

    def tell_reconfigured(self, message):
        """The holder's answer to `reconfigure()`: a failure is one line."""
        if message["reconfigured"]:
            print(f"sinfonia-tier3: cannot change the application's network: "
                  f"{_printable(message['reconfigured'])}", file=sys.stderr)

    def reconfigure(self, addresses, routes, resolv_conf):
        """While the application runs: move the interface to new addresses
        and routes, and rewrite resolv.conf (None: leave it) where they
        changed. The holder's answer comes to `wait()`, which says any
        failure in one line."""
        network = {"addresses": [str(address) for address in addresses],
                   "routes": [str(route) for route in routes]}
        if resolv_conf == self.resolv_conf:
            resolv_conf = None
        if network == self.network and resolv_conf is None:
            return
        self.send({"reconfigure": {
            "interface": self.interface.name, "old": self.network, "new": network,
            "resolv_conf": resolv_conf, "resolv_conf_placed": self.resolv_conf is not None}})
        self.network = network
        if resolv_conf is not None:
            self.resolv_conf = resolv_conf

    def run(self, command, env_extra, tick=None, listener=None):
        """Start `command` (`_application_command`) with the tool's
        environment plus `env_extra`; its exit status. `tick()`, when given,
        runs every _TICK s meanwhile. With the session's `listener` socket,
        later invocations join the session through it (`_JoinedCommands`),
        and the session lasts until the last of their commands has ended too."""
        command, env = _application_command(command, os.environ, env_extra)
        join_env = env_extra if listener is not None else None
        self.start(command, env, listener, join_env)
        return self.wait(tick)

    def serve_without_application(self, listener, join_env):
        """For forwards alone: init serves with no application, letting later
        invocations join through the session's `listener` (if any) for as
        long as the namespace lasts; its answers come to `channel`."""
        self.send({"command": None, "join_env": join_env},
                  fds=() if listener is None else [listener.fileno()])
        if listener is not None:
            listener.close()

    def start(self, command, env, listener=None, join_env=None):
        """Let the application run: exec `command` (found on env's PATH).
        From now until `wait()` returns, SIGINT, SIGTERM and SIGHUP to the
        tool go to the application. The `listener` socket, if any, goes to
        the namespace's init, where joiners' commands get `join_env`."""
        import signal

        try:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._handlers[signum] = signal.signal(signum, self._forward)
        except ValueError:  # not the main thread: signals stay as they are
            pass
        self._terminal = _foreground_terminal()
        message = {"command": list(command), "env": dict(env), "terminal": self._terminal,
                   "join_env": join_env}
        self.send(message, fds=() if listener is None else [listener.fileno()])
        if listener is not None:
            listener.close()  # init's now: the session's socket ends with init

    def wait(self, tick=None):
        """The application's exit status; `tick()` runs every _TICK s meanwhile."""
        import select

        failure = None
        try:
            while True:  # until the namespace's init has gone
                if tick is not None and not select.select([self._channel], [], [], _TICK)[0]:
                    tick()
                    continue
                message, _ = self._channel.receive()
                if message is None:
                    break
                if "stopped" in message:
                    self._suspend()
                elif "reconfigured" in message:
                    self.tell_reconfigured(message)
                elif "lasting" in message:  # the application ended, joined ones run
                    self._give_back_terminal()
                    print(f"sinfonia-tier3: the application has ended; the session "
                          f"goes on until its {message['lasting']} joined "
                          "command(s) end", file=sys.stderr, flush=True)
                elif "error" in message:  # exec failed (with a status), or init
                    failure = message
            status = self._reap()
        finally:
            self._restore()
        if failure is not None and "status" in failure:
            raise _CommandError(failure["error"], failure["status"])
        if failure is not None:
            raise TunnelError(failure["error"])
        return status

    def _suspend(self):
        """The application stopped (Ctrl-Z): stop the tool too, so that the
        shell it runs under takes the terminal back; once continued (fg or
        bg), continue the application, in the foreground if the tool is."""
        import signal

        self._give_back_terminal()
        os.kill(os.getpid(), signal.SIGSTOP)
        self._terminal = _foreground_terminal()  # `fg` gives one, `bg` none
        self.send({"continue": self._terminal})

    def _forward(self, signum, frame):
        try:
            self._channel.send({"signal": signum})
        except OSError:
            pass

    def _give_back_terminal(self):
        """Make the tool's process group the terminal's foreground again."""
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

    def _restore(self):
        """The tool's own signal handling and terminal back, as before start()."""
        import signal

        while self._handlers:
            signum, handler = self._handlers.popitem()
            signal.signal(signum, handler)
        self._give_back_terminal()
        self._terminal = None

    def _reap(self):
        if self._status is None:
            self._status = _exit_status(os.waitpid(self.pid, 0)[1])
        return self._status

    def close(self):
        """Kill the holder if still there, and reap it (idempotent)."""
        if self._status is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            self._reap()
        self._restore()
        self._channel.close()
        if self.relay is not None:  # dying with the holder: wait (briefly) for its ports to close
            import socket

            try:
                while self.relay.receive(2.0)[0] is not None:
                    pass
            except (socket.timeout, OSError):
                pass
            self.relay.close()
            self.relay = None


class _InterfaceFailedError(TunnelError):
    """The namespace never got its tunnel interface: this backend cannot work
    here, where another one might."""


# Sessions of one backend share one tunnel: a later invocation for a backend
# whose session runs here joins it (its command runs in that session's
# namespaces, started by their init), rather than make a second tunnel with
# the same key, which would take the cloudlet's one peer from the first.
#
# Why init starts joined commands, rather than the joiner entering the
# namespaces with setns(): init already starts, reaps and signals the
# application, and decides when the PID namespace (the session) ends; a
# command it starts is one more child, dropped of capabilities by the same
# code, with the same environment rules, for either backend (also behind
# the sudo root helper, which never sees a join). A joiner using setns()
# would need the namespaces' owner's privileges (root's, for a root
# session), would enter a mount namespace only single-threaded, and its
# command would be no child of init, which could then neither reap it nor
# know that the session must last. The joiner only sends its descriptors
# and waits.


class _SessionSocket:
    """Where the sessions of one backend meet: a Unix socket named after the
    backend's uuid and the key cache (another cache means another key and
    another session), in `$XDG_RUNTIME_DIR/sinfonia` when that runtime
    directory is the user's, else in the key cache directory; 0700 both.

    `join(command)` runs `command` in the session listening there, or, when
    none does (no socket, or the stale one of a killed session), binds this
    invocation's `listener` in its place, for `_Namespace.run` to hand to
    init. Both happen under an flock on a lock file beside the socket, so
    that of two first starts at once one makes the session and one joins
    it. `close()` removes the socket if it is still this one's.
    """

    def __init__(self, uuid):
        import hashlib

        cache = _key_cache_dir()
        runtime = os.environ.get("XDG_RUNTIME_DIR", "")
        try:
            info = os.stat(runtime) if os.path.isabs(runtime) else None
        except OSError:
            info = None
        if info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
            self._directory = os.path.join(runtime, "sinfonia")
        else:
            self._directory = cache
        digest = hashlib.sha256(os.path.realpath(cache).encode()).hexdigest()[:16]
        self._name = f"session-{uuid}-{digest}"
        self._uuid = uuid
        self._dir_fd = None
        self._inode = None  # of the socket file this invocation bound
        self.listener = None

    def _address(self):
        """The socket's address, through a descriptor of its directory: no
        path length limit, and the directory checked is the one used."""
        if self._dir_fd is None:
            _prepare_private_dir(self._directory, "session directory")
            self._dir_fd = os.open(self._directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._dir_fd}/{self._name}"

    def _locked(self):
        """The lock file's descriptor, locked (closing it unlocks)."""
        self._address()
        fd = os.open(f"{self._name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=self._dir_fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def connect(self):
        """A channel to the running session's init, or None when none listens."""
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(self._address())
            if _peer_uid(sock) != os.geteuid():
                raise TunnelError(f"the session socket in {self._directory} is "
                                  "another user's")
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            return None
        except OSError as e:
            sock.close()
            raise TunnelError(f"cannot reach the session socket in {self._directory}: "
                              f"{e.strerror}") from None
        return _Channel(sock)

    def running(self):
        """Whether a session of this backend runs (a look, which init ignores)."""
        try:
            channel = self.connect()
        except (SinfoniaError, OSError):
            return False
        finally:
            self.close()
        if channel is None:
            return False
        channel.close()
        return True

    def join(self, command):
        """`command`'s exit status once it ran in the running session; None
        when there is none, and this invocation's `listener` is bound (or,
        where no socket can be made, such as in a read-only key cache, this
        session runs unjoinable, with a warning)."""
        import socket

        for _attempt in range(3):  # a session may end just as it is joined
            try:
                lock = self._locked()
            except OSError as e:
                _warn(f"no later invocation can join this session: cannot lock "
                      f"{os.path.join(self._directory, self._name)}.lock: {e.strerror}")
                return None
            try:
                channel = self.connect()
                if channel is None:
                    try:
                        os.unlink(self._name, dir_fd=self._dir_fd)
                    except FileNotFoundError:
                        pass
                    self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    self.listener.bind(self._address())
                    self.listener.listen(16)
                    self._inode = os.stat(self._name, dir_fd=self._dir_fd).st_ino
                    return None
            except OSError as e:
                raise TunnelError(f"cannot make the session socket in {self._directory}: "
                                  f"{e.strerror}") from None
            finally:
                os.close(lock)
            status = self._run_joined(channel, command)
            if status is not None:
                return status
        raise TunnelError(f"the running session of {self._uuid} did not take the command")

    def _run_joined(self, channel, command):
        """The joiner's side of `_JoinedCommands`: `command`'s exit status, or
        None when the session ended before taking it. From the request on,
        SIGINT, SIGTERM and SIGHUP go to the command (after the request,
        never before it: they wait, blocked, until it is sent)."""
        import signal
        import socket

        terminal = None
        if _foreground_terminal() == 0 and os.isatty(1):
            try:
                terminal = _PseudoTerminal()
            except OSError:  # no pseudo-terminals here: the command gets ours as it is
                pass

        def forward(signum, frame):
            try:
                channel.send({"signal": signum})
            except OSError:
                pass

        forwarded = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
        handlers = {signum: signal.signal(signum, forward) for signum in forwarded}
        try:
            try:
                # The directory by name: a descriptor of it would lead into
                # this mount namespace from the session's, where getcwd() fails.
                request = {"command": list(command), "env": dict(os.environ),
                           "cwd": os.getcwd(), "terminal": terminal is not None}
                channel.send({"join": request},
                             fds=[0, 1, 2] if terminal is None else [terminal.inner] * 3)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
                try:
                    message, _ = channel.receive(2)
                except socket.timeout:
                    print(f"sinfonia-tier3: waiting for the session of {self._uuid} to "
                          "start", file=sys.stderr, flush=True)
                    message, _ = channel.receive()
            except (BrokenPipeError, ConnectionResetError):
                message = None
            except OSError as e:
                raise TunnelError(f"cannot join the running session: {e.strerror}") \
                    from None
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
                if terminal is not None:
                    os.close(terminal.inner)
            if message != {"joined": True}:
                if terminal is not None:
                    os.close(terminal.outer)
                return None
            # One write: the command may be writing to the same stderr already.
            sys.stderr.write(f"sinfonia-tier3: joined the running session of {self._uuid}\n")
            sys.stderr.flush()
            try:
                if terminal is not None:
                    terminal.relay(channel)
                message, _ = channel.receive()
            except OSError:
                message = None
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            channel.close()
        status = message.get("ended") if type(message) is dict else None
        if type(status) is not int or not 0 <= status <= 255:
            raise TunnelError("the joined session ended before its command did")
        return status

    def close(self):
        """Remove the socket file if it is still the one this invocation bound."""
        if self.listener is not None:
            self.listener.close()
        if self._inode is not None:
            try:
                lock = self._locked()
                try:
                    if os.stat(self._name, dir_fd=self._dir_fd).st_ino == self._inode:
                        os.unlink(self._name, dir_fd=self._dir_fd)
                finally:
                    os.close(lock)
            except OSError:
                pass  # gone already, or never to be removed: a stale one is replaced
            self._inode = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


class _PseudoTerminal:
    """A joined command's own terminal, when the joiner is its terminal's
    foreground job: a pseudo-terminal whose `inner` end becomes the
    command's controlling terminal in the session, and whose `outer` end
    this process relays to and from its own terminal, raw meanwhile (as
    ssh -t does), so that Ctrl-C, Ctrl-Z and the window size reach the
    command as they would at a terminal of its own."""

    def __init__(self):
        import termios

        self.outer, self.inner = os.openpty()
        termios.tcsetattr(self.inner, termios.TCSANOW, termios.tcgetattr(0))
        self._pass_window_size()

    def _pass_window_size(self, *signal_args):
        import termios

        size = fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8))
        fcntl.ioctl(self.outer, termios.TIOCSWINSZ, size)

    def relay(self, channel):
        """Relay until `channel` has something to say (the command ended),
        then the command's last output; the terminal is as it was after."""
        import select
        import signal
        import termios
        import tty

        saved = termios.tcgetattr(0)
        previous = signal.signal(signal.SIGWINCH, self._pass_window_size)
        tty.setraw(0, termios.TCSANOW)
        try:
            sources = {0: self.outer, self.outer: 1}  # what is copied where
            while True:
                readable = select.select([*sources, channel], [], [])[0]
                for source in [s for s in sources if s in readable]:
                    if not self._copy(source, sources[source]):
                        del sources[source]  # our terminal, or the command's, hung up
                if channel in readable:
                    while self._copy(self.outer, 1, drain=True):
                        pass
                    return
        finally:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
            signal.signal(signal.SIGWINCH, previous)
            os.close(self.outer)

    @staticmethod
    def _copy(source, target, drain=False):
        """Copy what `source` has to `target`; False at its end (or, with
        `drain`, once it has nothing more right now)."""
        import select

        if drain and not select.select([source], [], [], 0)[0]:
            return False
        try:
            data = os.read(source, 65536)
        except OSError:  # EIO: the command's side is closed
            return False
        view = memoryview(data)
        while view:
            view = view[os.write(target, view):]
        return bool(data)


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
            host = _ip_literal(str(endpoint[0]), ipaddress.ip_address)
        except ValueError:
            refuse("endpoint address must be an IPv4 or IPv6 literal")
        if host.is_unspecified or host.is_multicast:
            refuse(f"endpoint address {host} cannot be a peer")
        endpoint = (host, port(endpoint[1], "endpoint port", 1))
    networks = []
    for network in allowed_ips:
        try:
            networks.append(_ip_literal(str(network), ipaddress.ip_network))
        except ValueError:
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
    except (UnicodeDecodeError, ValueError):  # a number of 5000 digits too
        refuse("not a JSON object")
    except RecursionError:
        refuse("nested too deeply")
    if type(request) is not dict or set(request) != set(_KERNEL_LINK_FIELDS):
        refuse("expected exactly the keys " + ", ".join(_KERNEL_LINK_FIELDS))
    if type(request["listen_port"]) is not int or request["listen_port"] != 0:
        # A chosen port would be bound as root in the caller's namespace.
        refuse("listen_port must be 0: the kernel picks the port")

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


def _changeable_by_others(path):
    """Why someone other than root could change what `path` names, or None.

    The path and every directory above it must be owned by root and writable
    by no group or other, both as written and with its symlinks resolved. A
    missing path is what its directory allows (whoever may write there may
    create it); a sticky directory such as /tmp is fine above an entry that
    exists, since only root may then rename or remove that root-owned entry.
    """
    for start in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        current, below_exists = start, False
        while True:
            try:
                info = os.lstat(current)
            except OSError:
                below_exists = False
            else:
                if not stat.S_ISLNK(info.st_mode):  # replaced only by its directory's owner
                    if info.st_uid != 0:
                        return f"{current} is owned by uid {info.st_uid}, not root"
                    if info.st_mode & 0o022 and not (below_exists and
                                                      info.st_mode & stat.S_ISVTX):
                        return f"{current} is writable by others than root"
                below_exists = True
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
    return None


def _check_root_owned_code():
    """Refuse to run as root from code that anyone but root could change: this
    file (or the zipapp holding it), the interpreter, and every directory
    Python imports from (a virtualenv in a user's home is one, `-I` or not)."""
    paths = [_this_program(), sys.executable]
    paths += [os.path.abspath(entry) for entry in sys.path]  # "" is the current directory
    for path in paths:
        why = _changeable_by_others(path)
        if why is not None:
            raise TunnelError(
                f"root helper: refusing to run code others could change: {why}; "
                "install sinfonia-tier3, Python, pynacl and pyroute2 root-owned (the "
                "distribution's packages, or under /usr/local/lib) and name that "
                "python3 -I in the sudoers rule")


def _root_helper_main(args, stdin):
    """`--root-helper PID IFNAME`, run as root by sudo: create, configure and
    move one kernel WireGuard link into the invoking user's namespace.

    Everything is untrusted: the arguments, SUDO_UID and the configuration on
    `stdin`. Returns the exit status; every refusal is one line on stderr, and
    so is anything unforeseen: root never prints a traceback.
    """
    try:
        return _root_helper(args, stdin)
    except SinfoniaError as e:
        print(f"sinfonia-tier3: {e}", file=sys.stderr)
        return e.exit_status
    except BaseException as e:  # noqa: BLE001 - one line, whatever happened
        print(f"sinfonia-tier3: root helper failed: {type(e).__name__}: "
              f"{_printable(e)}", file=sys.stderr)
        return 125


def _root_helper(args, stdin):
    """The root helper's one job; raises SinfoniaError for every refusal."""
    if os.geteuid() != 0:
        raise TunnelError("root helper: must run as root (through sudo)")
    _check_root_owned_code()
    sudo_uid = os.environ.get("SUDO_UID", "")
    if not (sudo_uid.isascii() and sudo_uid.isdigit() and len(sudo_uid) <= 10):
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
    """The sudo command line that runs the root helper for `pid` and `ifname`:
    Python isolated (-I), so that nothing beside the file, on PYTHONPATH or in
    the user's site-packages is imported as root."""
    return ["sudo", *(() if interactive else ("-n",)), "--", sys.executable, "-I",
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


_NETLINK_GENERIC = 16
_GENL_ID_CTRL = 0x10
_CTRL_CMD_GETFAMILY = 3
_CTRL_ATTR_FAMILY_ID = 1
_CTRL_ATTR_FAMILY_NAME = 2
_WG_CMD_GET_DEVICE, _WG_CMD_SET_DEVICE = 0, 1
_WGDEVICE_A_IFNAME = 2
_WGDEVICE_A_FLAGS = 5
_WGDEVICE_A_PEERS = 8
_WGDEVICE_F_REPLACE_PEERS = 1
_WGPEER_A_PUBLIC_KEY = 1
_WGPEER_A_FLAGS = 3
_WGPEER_A_ENDPOINT = 4
_WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = 5
_WGPEER_A_LAST_HANDSHAKE_TIME = 6
_WGPEER_A_RX_BYTES = 7
_WGPEER_A_TX_BYTES = 8
_WGPEER_A_ALLOWEDIPS = 9
_WGPEER_F_REPLACE_ALLOWEDIPS = 2
_WGALLOWEDIP_A_FAMILY, _WGALLOWEDIP_A_IPADDR, _WGALLOWEDIP_A_CIDR_MASK = 1, 2, 3
_NLA_F_NESTED = 0x8000
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3


class _KernelLinkInside(_LinkMovedIn):
    """The kernel backend's interface: a link moved in by the tool, plus a
    generic netlink socket opened inside the namespace and handed to the tool,
    which watches the link's handshake through it (the tool itself cannot
    enter the namespace)."""

    def create(self, channel):
        import socket

        fds = super().create(channel)
        watcher = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC)
        return [*fds, watcher.detach()]


def _nlattrs(data):
    """Netlink attributes in `data` as {type: payload}; nested flags dropped."""
    attrs = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return attrs


def _nlattr(kind, payload):
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _genl_request(sock, family, command, attrs, flags=0):
    """Send one generic netlink request; the payloads (after the genl header)
    of the answers, until the dump ends or the request is acknowledged."""
    body = struct.pack("=BBH", command, 1, 0) + attrs
    sock.send(struct.pack("=IHHII", 16 + len(body), family,
                          _NLM_F_REQUEST | _NLM_F_ACK | flags, 1, 0) + body)
    answers = []
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if length < 16:
                raise TunnelError("malformed netlink answer")
            if kind == _NLMSG_ERROR:
                (error,) = struct.unpack_from("=i", data, offset + 16)
                if error:
                    raise TunnelError(f"netlink: {os.strerror(-error)}")
                return answers
            if kind == _NLMSG_DONE:
                return answers
            answers.append(data[offset + 20:offset + length])
            offset += (length + 3) & ~3


def _wireguard_family(sock):
    """The generic netlink family id of WireGuard, asked over `sock`."""
    (family,) = _genl_request(sock, _GENL_ID_CTRL, _CTRL_CMD_GETFAMILY,
                              _nlattr(_CTRL_ATTR_FAMILY_NAME, b"wireguard\0"))[:1]
    return struct.unpack("=H", _nlattrs(family)[_CTRL_ATTR_FAMILY_ID][:2])[0]


def _kernel_peer_state(sock, ifname):
    """(last handshake in epoch seconds or 0, bytes received, bytes sent) of
    the peer of kernel WireGuard link `ifname` (in `sock`'s namespace).

    Generic netlink by hand, not pyroute2's WireGuard: the tool itself has not
    loaded pyroute2 (only the holder has), and loading it here costs 100-170 ms
    before the first look and 12 MiB for the whole session with pyroute2 0.9
    (65 ms with Debian's 0.7.2), for requests of a few attributes."""
    for answer in _genl_request(sock, _wireguard_family(sock), _WG_CMD_GET_DEVICE,
                                _nlattr(_WGDEVICE_A_IFNAME, ifname.encode() + b"\0"),
                                _NLM_F_DUMP):
        for peer in _nlattrs(_nlattrs(answer).get(_WGDEVICE_A_PEERS, b"")).values():
            attrs = _nlattrs(peer)
            values = [attrs.get(kind, b"")[:8] for kind in (
                _WGPEER_A_LAST_HANDSHAKE_TIME, _WGPEER_A_RX_BYTES, _WGPEER_A_TX_BYTES)]
            return tuple(struct.unpack("=q", v)[0] if len(v) == 8 else 0 for v in values)
    return 0, 0, 0


def _kernel_handshake_seen(sock, ifname):
    """Whether kernel WireGuard link `ifname` has had a handshake with its peer."""
    return _kernel_peer_state(sock, ifname)[0] > 0


def _kernel_replace_peer(sock, ifname, public_key, endpoint, allowed_ips,
                         persistent_keepalive):
    """Make the peer of kernel WireGuard link `ifname` (in `sock`'s
    namespace) a new one: `public_key` at `endpoint` (an IP literal and a
    port), which starts without session keys (a new handshake). Over a
    socket opened inside the namespace, it needs CAP_NET_ADMIN over the
    namespace, which root has, and the user who owns its user namespace."""
    import ipaddress
    import socket

    host, port = endpoint
    address = ipaddress.ip_address(host)
    if address.version == 4:
        sockaddr = struct.pack("=H", socket.AF_INET) + struct.pack(">H", port) \
            + address.packed + bytes(8)
    else:
        sockaddr = struct.pack("=H", socket.AF_INET6) + struct.pack(">HI", port, 0) \
            + address.packed + bytes(4)
    allowed = b"".join(_nlattr(_NLA_F_NESTED, b"".join((
        _nlattr(_WGALLOWEDIP_A_FAMILY, struct.pack(
            "=H", socket.AF_INET if network.version == 4 else socket.AF_INET6)),
        _nlattr(_WGALLOWEDIP_A_IPADDR, network.network_address.packed),
        _nlattr(_WGALLOWEDIP_A_CIDR_MASK, bytes((network.prefixlen,))))))
        for network in allowed_ips)
    peer = b"".join((
        _nlattr(_WGPEER_A_PUBLIC_KEY, bytes(public_key)),
        _nlattr(_WGPEER_A_FLAGS, struct.pack("=I", _WGPEER_F_REPLACE_ALLOWEDIPS)),
        _nlattr(_WGPEER_A_ENDPOINT, sockaddr),
        _nlattr(_WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H",
                                                                      persistent_keepalive)),
        _nlattr(_WGPEER_A_ALLOWEDIPS | _NLA_F_NESTED, allowed)))
    _genl_request(sock, _wireguard_family(sock), _WG_CMD_SET_DEVICE, b"".join((
        _nlattr(_WGDEVICE_A_IFNAME, ifname.encode() + b"\0"),
        _nlattr(_WGDEVICE_A_FLAGS, struct.pack("=I", _WGDEVICE_F_REPLACE_PEERS)),
        _nlattr(_WGDEVICE_A_PEERS | _NLA_F_NESTED, _nlattr(_NLA_F_NESTED, peer)))))


def _endpoint_literal(host, port):
    """The endpoint with its host as an IP literal: the root helper takes no names."""
    import ipaddress
    import socket

    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise TunnelError(f"cannot resolve the tunnel endpoint {host}: {e}") from None
    return infos[0][4][0], port


# Tunnels: the two backends ###################################################
#
# Each backend forks the application's namespace holder at construction, so
# that its set-up overlaps the Tier 1 request; `connect()` then brings the
# deployment's tunnel up in it and returns once the cloudlet has answered the
# first handshake, `run()` runs the application, `close()` (or leaving the
# `with` block) removes everything.


def _no_answer(config, connect_timeout):
    """The one line for a cloudlet that never completed the first handshake."""
    return TunnelError(
        f"the cloudlet did not answer at its endpoint {config.endpoint} within "
        f"{connect_timeout:g} s: check that UDP to it gets through, or allow more "
        "time with --connect-timeout")


def _resolv_conf_or_none(config):
    """The namespace's resolv.conf; None keeps the host's (no nameservers given)."""
    return _render_resolv_conf(config) if config.nameservers else None


class _Tunnel:
    """What both backends share: the namespace, the application, the end."""

    name = None

    def __init__(self, interface, mtu, relay):
        self.namespace = _Namespace(interface, mtu=mtu, relay=relay)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def progress(self, what, debug):
        if debug:
            elapsed = (time.monotonic() - self.namespace.forked) * 1000
            _debug(f"{what} ({elapsed:.0f} ms after the holder was forked)")

    def wait_for(self, targets, timeout, debug=False):
        """Return once the backend answers at each (host, port) of `targets`."""
        self.namespace.wait_for(targets, timeout, debug=debug)

    def run(self, command, env_extra, tick=None, listener=None):
        """The application's exit status, once it has run behind the tunnel
        (and the commands that joined through `listener` with it); `tick()`
        runs every _TICK s meanwhile (`_TunnelKeeper.tick`)."""
        return self.namespace.run(command, env_extra, tick, listener)

    def close(self):
        self.namespace.close()


class _UserspaceTunnel(_Tunnel):
    """The rootless backend: a TUN device made inside the namespace, and this
    process's own WireGuard datapath between it and a UDP socket here."""

    name = "userspace"

    def __init__(self, mtu=_DEFAULT_MTU, relay=False):
        super().__init__(_TunInside(), mtu, relay)
        self._mtu = mtu
        self._tun_fd = None
        self._datapath = None

    def connect(self, config, keypair, *, connect_timeout=_DEFAULT_CONNECT_TIMEOUT,
                debug=False):
        fds = self.namespace.receive_interface()
        if len(fds) != 1:
            raise TunnelError("the application's namespace sent no TUN device")
        (self._tun_fd,) = fds
        self.progress("TUN device handed over", debug)

        def make_datapath():
            self._datapath = Datapath(
                self._tun_fd, keypair.private, config.public_key,
                endpoint=config.endpoint,
                allowed_ips=config.allowed_ips, persistent_keepalive=_PERSISTENT_KEEPALIVE,
                mtu=self._mtu)

        self.namespace.configure(config.addresses, config.allowed_ips,
                                 _resolv_conf_or_none(config), meanwhile=make_datapath)
        self.progress("addresses, routes and resolv.conf in place", debug)
        # Only now: the workers' memory and pyroute2's, which goes with the
        # holder's exec, would otherwise add up.
        self._datapath.start()
        try:
            self._datapath.wait_for_handshake(connect_timeout)
        except _NoHandshakeError:
            raise _no_answer(config, connect_timeout) from None
        self.progress(f"handshake with {config.endpoint} done; starting the application",
                      debug)

    def trouble(self):
        """Why the tunnel looks lost (a TunnelError), or None (`Datapath.trouble`)."""
        return self._datapath.trouble()

    def handshake_done(self):
        """Whether the peer has answered since the last `apply`."""
        return self._datapath.handshake_done()

    def apply(self, config):
        """Point the running tunnel at `config`'s cloudlet (key, endpoint
        resolved again, allowed IPs) with a new handshake; the endpoint's
        address. The application's addresses are `namespace.reconfigure`'s."""
        self._datapath.restart(config.public_key, config.endpoint, config.allowed_ips)
        return self._datapath.stats()["endpoint"][0]

    def close(self):
        if self._datapath is not None:
            self._datapath.stop()
            self._datapath = None
        if self._tun_fd is not None:
            os.close(self._tun_fd)
            self._tun_fd = None
        super().close()


class _KernelTunnel(_Tunnel):
    """The kernel backend: a kernel WireGuard link made in this network
    namespace (as root, or by the sudo root helper) and moved into the
    application's, its handshakes watched over a netlink socket from inside."""

    name = "kernel"

    def __init__(self, mtu=_DEFAULT_MTU, relay=False):
        import secrets

        super().__init__(_KernelLinkInside("st3" + secrets.token_hex(4)), mtu, relay)
        self._watcher = None
        self._traffic = (0, 0)  # bytes received and sent at the last look
        self._unanswered_since = None

    def connect(self, config, keypair, *, connect_timeout=_DEFAULT_CONNECT_TIMEOUT,
                debug=False):
        import socket

        spec = _kernel_link_spec(
            keypair.private, config.public_key,
            endpoint=_endpoint_literal(*config.endpoint),
            allowed_ips=config.allowed_ips, persistent_keepalive=_PERSISTENT_KEEPALIVE)
        use_sudo = os.geteuid() != 0
        ifname = self.namespace.interface.name

        def move_link(pid):
            _provide_kernel_link(pid, ifname, spec, use_sudo=use_sudo)
            self.progress(f"kernel WireGuard link {ifname} created "
                          f"{'by the sudo root helper' if use_sudo else 'as root'}", debug)

        fds = self.namespace.receive_interface(move_link)
        if len(fds) != 1:
            raise TunnelError("the application's namespace sent no netlink socket")
        self._watcher = socket.socket(fileno=fds[0])
        self.namespace.configure(config.addresses, config.allowed_ips,
                                 _resolv_conf_or_none(config))
        deadline = time.monotonic() + connect_timeout
        while not _kernel_handshake_seen(self._watcher, ifname):
            if time.monotonic() > deadline:
                raise _no_answer(config, connect_timeout)
            time.sleep(0.05)

    def trouble(self):
        """Why the tunnel looks lost (a TunnelError), or None. The kernel
        keeps no time of unanswered sending: what the link sent since it
        last received, other than lone keepalives (_KEEPALIVE_SIZE bytes),
        counts as unanswered from the look that saw it, and the tunnel is
        lost after _DATA_LOST_AFTER s of it (a handshake too: the kernel's
        initiations count as sent)."""
        try:
            _, received, sent = _kernel_peer_state(self._watcher, self.namespace.interface.name)
        except (OSError, TunnelError) as e:
            return TunnelError(f"cannot read the kernel WireGuard link: {e}")
        now = time.monotonic()
        last_received, last_sent = self._traffic
        self._traffic = received, sent
        if received != last_received:
            self._unanswered_since = None
        elif sent - last_sent not in (0, _KEEPALIVE_SIZE) and self._unanswered_since is None:
            self._unanswered_since = now
        if self._unanswered_since is not None and \
                now - self._unanswered_since >= _DATA_LOST_AFTER:
            return TunnelError(f"no answer for {now - self._unanswered_since:.0f} s")
        return None

    def handshake_done(self):
        """Whether the peer has answered since the last `apply`."""
        try:
            return _kernel_handshake_seen(self._watcher, self.namespace.interface.name)
        except (OSError, TunnelError):
            return False

    def apply(self, config):
        """Make the link's peer `config`'s cloudlet (key, endpoint resolved
        again, allowed IPs), from scratch: a new handshake. The endpoint's
        address."""
        endpoint = _endpoint_literal(*config.endpoint)
        try:
            _kernel_replace_peer(self._watcher, self.namespace.interface.name,
                                 config.public_key, endpoint, config.allowed_ips,
                                 _PERSISTENT_KEEPALIVE)
        except OSError as e:
            raise TunnelError(f"cannot change the kernel WireGuard link: {e.strerror}") \
                from None
        self._traffic, self._unanswered_since = (0, 0), None
        return endpoint[0]

    def close(self):
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        super().close()


_TUNNELS = {tunnel.name: tunnel for tunnel in (_UserspaceTunnel, _KernelTunnel)}


# Forwards: -L, -D and -R ####################################################
#
# The backend reached from the caller's own namespace, for applications that
# cannot be started by the tool (a running browser, an IDE, a service):
#
#   -L [BIND:]PORT:HOST:HOSTPORT  listen here, connect HOST:HOSTPORT in there
#   -D [BIND:]PORT                a SOCKS5 server here, connecting in there
#   -R [BIND:]PORT:HOST:HOSTPORT  listen in there, connect HOST:HOSTPORT here
#
# Each connection is carried by a relay that runs where its connections are
# made, since names resolve and addresses route only there: for -L and -D
# the relay process, forked by the holder once the namespace's network is
# set up; for -R a thread of the tool. The listening socket is made on the
# other side (here before anything is deployed, so that a port in use fails
# at once; in there by the relay) and crosses over SCM_RIGHTS: a socket
# keeps its network namespace wherever it is used. This needs nothing per
# connection from the other side, where handing over connected sockets
# instead would take a round trip for each one.
#
# One selectors loop per relay carries every connection both ways, reading
# from one side only while the other has taken what came before (a chunk per
# direction at most in memory), and passing on half-closes.

_RELAY_CHUNK = 256 * 1024
_RELAY_CONNECT_TIMEOUT = 10.0  # seconds for a target to accept
_RELAY_RESOLVERS = 4  # threads resolving names, so that no lookup stalls the loop
_MAX_FORWARDS = 64
_SOCKS_VERSION = 5
_SOCKS_NO_AUTHENTICATION, _SOCKS_NO_ACCEPTABLE_METHOD = 0x00, 0xFF
_SOCKS_CONNECT, _SOCKS_UDP_ASSOCIATE = 1, 3
_SOCKS_IPV4, _SOCKS_DOMAIN, _SOCKS_IPV6 = 1, 3, 4
(_SOCKS_SUCCEEDED, _SOCKS_GENERAL_FAILURE, _SOCKS_NETWORK_UNREACHABLE,
 _SOCKS_HOST_UNREACHABLE, _SOCKS_CONNECTION_REFUSED) = 0, 1, 3, 4, 5
_SOCKS_COMMAND_NOT_SUPPORTED, _SOCKS_ADDRESS_TYPE_NOT_SUPPORTED = 7, 8
_FORWARD_SYNTAX = {"-L": "[BIND_ADDRESS:]PORT:HOST:HOSTPORT", "-D": "[BIND_ADDRESS:]PORT",
                   "-R": "[BIND_ADDRESS:]PORT:HOST:HOSTPORT"}


class _ForwardSpec(namedtuple("_ForwardSpec", "option text bind_host bind_port host port")):
    """One -L, -D or -R as given: bind_host None is the default (loopback
    here, the tunnel address in there); host and port are None for -D."""

    def as_message(self):
        return dict(self._asdict())


def _is_host_name(text):
    """Whether `text` is a DNS name as resolvers take it (letters, digits,
    hyphens, underscores, dots; nothing else reaches getaddrinfo)."""
    import re

    return len(text) <= 253 and re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?",
                                             text) is not None


def _parse_forward(option, text):
    """The `_ForwardSpec` of `option` ("-L", "-D", "-R") `text`, in ssh's
    syntax with IPv6 literals in brackets; UsageError when it is not one."""
    import ipaddress
    import re

    def bad(why):
        return UsageError(f"{option} {text!r}: {why} (expected {_FORWARD_SYNTAX[option]})")

    parts = []
    for match in re.finditer(r"(\[[^\[\]]*\]|[^:\[\]]*)(:|$)", text):
        parts.append(match.group(1))
        if not match.group(2):
            break
    if ":".join(parts) != text:
        raise bad("brackets only go around a whole IPv6 address")
    sizes = (1, 2) if option == "-D" else (3, 4)
    if len(parts) not in sizes:
        raise bad(f"{len(parts)} parts")
    if len(parts) == sizes[0]:
        parts.insert(0, None)

    def port(part, lowest):
        if not (part.isascii() and part.isdigit()) or not lowest <= int(part) <= 65535:
            raise bad(f"{part!r} is not a port number")
        return int(part)

    def literal(part):
        try:
            return ipaddress.ip_address(part[1:-1] if part.startswith("[") else part)
        except ValueError:
            return None

    bind_host = parts[0]
    if bind_host is not None:
        if bind_host == "localhost":
            bind_host = "127.0.0.1"
        elif literal(bind_host) is None:
            raise bad(f"{bind_host!r} is not an IP address to listen on")
        else:
            bind_host = str(literal(bind_host))
    bind_port = port(parts[1], 0)  # 0: any free port, told once listening
    host = target_port = None
    if option != "-D":
        host = parts[2]
        if literal(host) is not None:
            host = str(literal(host))
        elif host.startswith("[") or not _is_host_name(host):
            raise bad(f"{host!r} is not a host name or IP address")
        target_port = port(parts[3], 1)
    return _ForwardSpec(option, text, bind_host, bind_port, host, target_port)


def _listen(spec, host, kind=None):
    """A socket bound to `host` and the spec's port, listening for TCP
    (`kind` SOCK_DGRAM: a UDP socket on any port of `host`); one line on failure."""
    import ipaddress
    import socket

    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    kind = kind or socket.SOCK_STREAM
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, spec.bind_port))
            sock.listen(128)
        else:
            sock.bind((host, 0))
    except OSError as e:
        sock.close()
        where = str(_Endpoint(host, spec.bind_port if kind == socket.SOCK_STREAM else 0))
        raise TunnelError(f"{spec.option} {spec.text}: cannot listen on {where}: "
                          f"{e.strerror}") from None
    return sock


def _bound_text(sock):
    return str(_Endpoint(*sock.getsockname()[:2]))


def _socks_reply_code(error):
    """The SOCKS5 reply for a connection that failed with `error`."""
    import errno
    import socket

    if isinstance(error, socket.gaierror):
        return _SOCKS_HOST_UNREACHABLE
    return {errno.ECONNREFUSED: _SOCKS_CONNECTION_REFUSED,
            errno.ENETUNREACH: _SOCKS_NETWORK_UNREACHABLE,
            errno.EHOSTUNREACH: _SOCKS_HOST_UNREACHABLE,
            errno.ETIMEDOUT: _SOCKS_HOST_UNREACHABLE}.get(error.errno,
                                                          _SOCKS_GENERAL_FAILURE)


class _SocksError(Exception):
    """A SOCKS5 client said something it may not: `code` is the reply to
    give it before closing, or None to close without one."""

    def __init__(self, code=None):
        super().__init__(code)
        self.code = code


def _socks_address(data, offset):
    """(host, port, end) of the SOCKS5 address at `offset` (ATYP, address,
    port), None while incomplete; _SocksError when unusable."""
    import ipaddress

    if len(data) <= offset:
        return None
    kind = data[offset]
    if kind == _SOCKS_IPV4:
        size, start = 4, offset + 1
    elif kind == _SOCKS_IPV6:
        size, start = 16, offset + 1
    elif kind == _SOCKS_DOMAIN:
        if len(data) <= offset + 1:
            return None
        size, start = data[offset + 1], offset + 2
    else:
        raise _SocksError(_SOCKS_ADDRESS_TYPE_NOT_SUPPORTED)
    end = start + size + 2
    if len(data) < end:
        return None
    raw = bytes(data[start:start + size])
    port = int.from_bytes(data[end - 2:end], "big")
    if kind == _SOCKS_DOMAIN:
        host = raw.decode("ascii", "replace")
        if not _is_host_name(host):
            raise _SocksError(_SOCKS_HOST_UNREACHABLE)  # resolves nowhere
    else:
        host = str(ipaddress.ip_address(raw))
    return host, port, end


def _socks_greeting(data):
    """(offers no authentication, length) of the SOCKS5 greeting at the
    start of `data`, None while incomplete; _SocksError when not one."""
    if not data:
        return None
    if data[0] != _SOCKS_VERSION:
        raise _SocksError()
    if len(data) < 2 or len(data) < 2 + data[1]:
        return None
    end = 2 + data[1]
    return _SOCKS_NO_AUTHENTICATION in data[2:end], end


def _socks_request(data):
    """(command, host, port, length) of the SOCKS5 request at the start of
    `data`, None while incomplete; _SocksError when not one."""
    if len(data) < 3:
        if data[:1] not in (b"", bytes([_SOCKS_VERSION])):
            raise _SocksError()
        return None
    if data[0] != _SOCKS_VERSION or data[2] != 0:
        raise _SocksError()
    address = _socks_address(data, 3)
    if address is None:
        return None
    host, port, end = address
    if data[1] not in (_SOCKS_CONNECT, _SOCKS_UDP_ASSOCIATE):
        raise _SocksError(_SOCKS_COMMAND_NOT_SUPPORTED)
    return data[1], host, port, end


def _socks_udp_datagram(data):
    """(host, port, payload) of a SOCKS5 UDP request datagram; _SocksError
    for anything to drop (fragments included, which are optional)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0:
        raise _SocksError()
    address = _socks_address(data, 3)
    if address is None:
        raise _SocksError()
    host, port, end = address
    return host, port, bytes(data[end:])


def _socks_encode_address(address):
    """ATYP, address and port of a socket address, as SOCKS5 replies carry them."""
    import ipaddress

    ip = ipaddress.ip_address(address[0].partition("%")[0])
    kind = _SOCKS_IPV4 if ip.version == 4 else _SOCKS_IPV6
    return bytes([kind]) + ip.packed + address[1].to_bytes(2, "big")


def _socks_reply(code, address=("0.0.0.0", 0)):
    """A SOCKS5 reply: `code`, and the address the connection goes out from."""
    return bytes([_SOCKS_VERSION, code, 0]) + _socks_encode_address(address)


class _Relay:
    """One event loop carrying the connections of some forwards: call the
    `add_*` methods, then `run(stop)` until `stop` (a socket) is readable."""

    def __init__(self):
        import selectors
        import socket

        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self.watch(self._wake_r, selectors.EVENT_READ, self._woken)
        self._executor = None
        self._lookups = []  # (future, callback) of names being resolved
        self._deadlines = {}  # callback -> monotonic time it is called at

    def watch(self, sock, events, callback):
        """Call `callback(mask)` when `sock` is ready for `events` (0: never)."""
        key = self._selector.get_map().get(sock)
        if not events:
            if key is not None:
                self._selector.unregister(sock)
        elif key is None:
            self._selector.register(sock, events, callback)
        elif key.events != events or key.data is not callback:
            self._selector.modify(sock, events, callback)

    def close_socket(self, sock):
        self.watch(sock, 0, None)
        sock.close()

    def at(self, deadline, callback):
        """Call `callback()` at monotonic `deadline` (None: cancel)."""
        if deadline is None:
            self._deadlines.pop(callback, None)
        else:
            self._deadlines[callback] = deadline

    def resolve(self, host, port, kind, callback):
        """Call `callback(addresses, error)`: getaddrinfo's answer for `host`,
        or the socket.gaierror; a name is looked up without stopping the loop."""
        import socket

        try:
            callback(socket.getaddrinfo(host, port, type=kind,
                                        flags=socket.AI_NUMERICHOST), None)
            return
        except socket.gaierror:
            pass  # a name, not an address
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(_RELAY_RESOLVERS)
        future = self._executor.submit(socket.getaddrinfo, host, port, type=kind)
        self._lookups.append((future, callback))
        future.add_done_callback(self._wake)

    def _wake(self, future):
        try:
            self._wake_w.send(b".")
        except OSError:  # full: the loop is woken already
            pass

    def _woken(self, mask):
        import socket

        self._wake_r.recv(4096)
        done = [(f, c) for f, c in self._lookups if f.done()]
        self._lookups = [(f, c) for f, c in self._lookups if not f.done()]
        for future, callback in done:
            try:
                callback(future.result(), None)
            except socket.gaierror as e:
                callback(None, e)

    def add_port_forward(self, listener, host, port, announce):
        """Carry each connection to `listener` to host:port (-L, -R); a
        target that fails is told with `announce(line)`."""
        def accepted(client):
            def connected(target, error):
                if error is not None:
                    announce(f"cannot connect to {_Endpoint(host, port)}: "
                             f"{_connect_failure(error)}")
                    self.close_socket(client)
                else:
                    _Splice(self, client, target)

            _Connect(self, host, port, connected)

        self._add_listener(listener, accepted)

    def add_socks(self, listener, udp):
        """A SOCKS5 server on `listener`; `udp` is the socket its clients
        send UDP ASSOCIATE datagrams to (on the same address)."""
        udp_port = _SocksUdpPort(self, udp)
        self._add_listener(listener, lambda client: _SocksSession(self, client, udp_port))

    def _add_listener(self, listener, accepted):
        import selectors
        import socket

        listener.setblocking(False)

        def ready(mask):
            for _ in range(64):  # then the others' turn
                try:
                    client, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:  # out of descriptors, say: clients wait a moment
                    self.watch(listener, 0, None)
                    self.at(time.monotonic() + 0.1, resume)
                    return
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                accepted(client)

        def resume():
            self.watch(listener, selectors.EVENT_READ, ready)

        resume()

    def run(self, stop):
        """Serve until `stop` is readable (or closed)."""
        import selectors

        stopped = []
        self.watch(stop, selectors.EVENT_READ, stopped.append)
        try:
            while not stopped:
                timeout = None
                if self._deadlines:
                    timeout = max(0.0, min(self._deadlines.values()) - time.monotonic())
                for key, mask in self._selector.select(timeout):
                    if self._selector.get_map().get(key.fileobj) is key:  # still watched
                        key.data(mask)
                now = time.monotonic()
                for callback, deadline in list(self._deadlines.items()):
                    # (one called before may have cancelled or moved it)
                    if deadline <= now and self._deadlines.get(callback) == deadline:
                        del self._deadlines[callback]
                        callback()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            for key in list(self._selector.get_map().values()):
                if key.fileobj is not stop:
                    key.fileobj.close()
            self._selector.close()


def _connect_failure(error):
    """Why a connection to a forward's target failed, for its one line."""
    import socket

    if isinstance(error, socket.gaierror):
        return f"the name does not resolve: {error.strerror}"
    return error.strerror or str(error)


class _Connect:
    """A TCP connection being made to host:port, one address after the other;
    then `done(sock, None)`, or `done(None, error)` with the last failure."""

    def __init__(self, relay, host, port, done):
        import socket

        self._relay, self._done = relay, done
        self._sock = None
        self._error = None
        self._addresses = []
        relay.resolve(host, port, socket.SOCK_STREAM, self._resolved)

    def _resolved(self, addresses, error):
        if error is not None:
            self._done(None, error)
        else:
            self._addresses = list(addresses)
            self._try_next()

    def _try_next(self):
        import errno
        import selectors
        import socket

        while self._addresses:
            family, kind, proto, _, address = self._addresses.pop(0)
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            code = sock.connect_ex(address)
            if code in (0, errno.EINPROGRESS):
                self._sock = sock
                self._relay.watch(sock, selectors.EVENT_WRITE, self._ready)
                self._relay.at(time.monotonic() + _RELAY_CONNECT_TIMEOUT, self._timed_out)
                return
            sock.close()
            self._error = OSError(code, os.strerror(code))
        self._done(None, self._error)

    def _ready(self, mask):
        import socket

        self._relay.at(None, self._timed_out)
        sock, self._sock = self._sock, None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._relay.close_socket(sock)
            self._error = OSError(code, os.strerror(code))
            self._try_next()
        else:
            self._relay.watch(sock, 0, None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._done(sock, None)

    def _timed_out(self):
        import errno

        self._relay.close_socket(self._sock)
        self._sock = None
        self._error = OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
        self._try_next()


class _Splice:
    """Two connected sockets carried into each other until both directions
    have ended: what one side sends waits (one chunk at most) until the
    other takes it, and its end of sending becomes the other's (half-close)."""

    def __init__(self, relay, a, b, to_a=b"", to_b=b""):
        import functools

        self._relay = relay
        self._socks = (a, b)
        self._pending = [memoryview(to_a), memoryview(to_b)]  # to be sent to each side
        self._ended = [False, False]  # each side has sent all it will
        self._shut = [False, False]  # each side was told the other's end
        self._callbacks = [functools.partial(self._ready, 0), functools.partial(self._ready, 1)]
        self._update()

    def _ready(self, side, mask):
        import selectors

        other = 1 - side
        try:
            if mask & selectors.EVENT_WRITE:
                self._send(side)
            if mask & selectors.EVENT_READ and not self._pending[other]:
                data = self._socks[side].recv(_RELAY_CHUNK)
                if data:
                    self._pending[other] = memoryview(data)
                    self._send(other)
                else:
                    self._ended[side] = True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # reset: nothing more goes either way
            self.close()
            return
        self._update()

    def _send(self, side):
        data = self._pending[side]
        if data:
            try:
                sent = self._socks[side].send(data)
            except (BlockingIOError, InterruptedError):
                return
            self._pending[side] = data[sent:]

    def _update(self):
        import selectors
        import socket

        for side in (0, 1):
            if self._ended[1 - side] and not self._pending[side] and not self._shut[side]:
                self._shut[side] = True
                try:
                    self._socks[side].shutdown(socket.SHUT_WR)
                except OSError:
                    self.close()
                    return
        if all(self._shut):
            self.close()
            return
        for side in (0, 1):
            events = 0
            if not self._ended[side] and not self._pending[1 - side]:
                events |= selectors.EVENT_READ
            if self._pending[side]:
                events |= selectors.EVENT_WRITE
            self._relay.watch(self._socks[side], events, self._callbacks[side])

    def close(self):
        for sock in self._socks:
            self._relay.close_socket(sock)


class _SocksSession:
    """One SOCKS5 client (RFC 1928, no authentication): its greeting and
    request are read as they come (every byte unvalidated until parsed),
    then CONNECT becomes a `_Splice` and UDP ASSOCIATE a `_SocksAssociation`."""

    _LONGEST = 2 + 255  # a greeting; a request is at most 4 + 1 + 255 + 2

    def __init__(self, relay, client, udp):
        import selectors

        self._relay, self._client, self._udp = relay, client, udp
        self._data = b""
        self._greeted = False
        self._association = None
        relay.watch(client, selectors.EVENT_READ, self._readable)
        relay.at(time.monotonic() + _RELAY_CONNECT_TIMEOUT, self.close)

    def _readable(self, mask):
        try:
            data = self._client.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        if self._association is not None:  # nothing more is said on this connection
            return
        self._data += data
        try:
            self._parse()
        except _SocksError as e:
            self._fail(e.code)

    def _parse(self):
        if not self._greeted:
            greeting = _socks_greeting(self._data)
            if greeting is None:
                if len(self._data) > self._LONGEST:
                    raise _SocksError()
                return
            acceptable, end = greeting
            if not acceptable:
                self._fail(_SOCKS_NO_ACCEPTABLE_METHOD, bytes([_SOCKS_VERSION]))
                return
            self._data = self._data[end:]
            self._greeted = True
            self._reply(bytes([_SOCKS_VERSION, _SOCKS_NO_AUTHENTICATION]))
        request = _socks_request(self._data)
        if request is None:
            if len(self._data) > self._LONGEST + 5:
                raise _SocksError()
            return
        command, host, port, end = request
        early, self._data = self._data[end:], b""
        self._relay.at(None, self.close)
        if command == _SOCKS_CONNECT:
            self._relay.watch(self._client, 0, None)  # until connected
            _Connect(self._relay, host, port, lambda target, error:
                     self._connected(target, error, early))
        else:
            self._association = _SocksAssociation(self._relay, self._client, self._udp,
                                                  port)
            self._reply(_socks_reply(_SOCKS_SUCCEEDED, self._association.address))

    def _connected(self, target, error, early):
        if error is not None:
            self._fail(_socks_reply_code(error))
            return
        reply = _socks_reply(_SOCKS_SUCCEEDED, target.getsockname())
        _Splice(self._relay, self._client, target, to_a=reply, to_b=early)

    def _reply(self, data):
        """Answer; a client whose buffer does not take a few bytes goes."""
        try:
            if self._client.send(data) == len(data):
                return
        except OSError:
            pass
        raise _SocksError()

    def _fail(self, code, prefix=None):
        if code is not None:
            message = prefix + bytes([code]) if prefix else _socks_reply(code)
            try:
                self._client.send(message)
            except OSError:
                pass
        self.close()

    def close(self):
        self._relay.at(None, self.close)
        if self._association is not None:
            self._association.close()
            self._association = None
        self._relay.close_socket(self._client)


class _SocksAssociation:
    """A UDP ASSOCIATE: datagrams from the client's address (that of its TCP
    connection, and its port once the first datagram shows it) to the -D
    socket go out from in here, and answers come back with their sender,
    until the TCP connection ends. Each association has sockets of its own
    in here, so that answers find their client."""

    def __init__(self, relay, client, udp, port):
        self._relay, self._udp = relay, udp
        self._client_host = client.getpeername()[0]
        self._client_port = port or None  # 0: known from its first datagram
        self.address = (client.getsockname()[0], udp.port)
        self._outgoing = {}  # address family -> socket in here
        udp.associations.append(self)

    def accepts(self, sender):
        """Whether a datagram from `sender` (host, port) is this client's."""
        if sender[0] != self._client_host:
            return False
        if self._client_port is None:
            self._client_port = sender[1]
        return sender[1] == self._client_port

    def send(self, data):
        """Send on the payload of a client's datagram, to where it says."""
        import socket

        try:
            host, port, payload = _socks_udp_datagram(data)
        except _SocksError:
            return

        def resolved(addresses, error):
            if error is None and addresses:
                family, _, _, _, address = addresses[0]
                try:
                    self._socket(family).sendto(payload, address)
                except OSError:
                    pass

        self._relay.resolve(host, port, socket.SOCK_DGRAM, resolved)

    def _socket(self, family):
        import functools
        import selectors
        import socket

        if family not in self._outgoing:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._outgoing[family] = sock
            self._relay.watch(sock, selectors.EVENT_READ,
                              functools.partial(self._answer, sock))
        return self._outgoing[family]

    def _answer(self, sock, mask):
        try:
            data, sender = sock.recvfrom(65535)
        except OSError:
            return
        self._udp.send_to(b"\0\0\0" + _socks_encode_address(sender) + data,
                          (self._client_host, self._client_port))

    def close(self):
        for sock in self._outgoing.values():
            self._relay.close_socket(sock)
        self._outgoing = {}
        self._udp.associations.remove(self)


class _SocksUdpPort:
    """The UDP socket of one -D, shared by its associations: each datagram
    goes to the association of its sender (dropped if none)."""

    def __init__(self, relay, udp):
        import selectors

        self.associations = []
        self.port = udp.getsockname()[1]
        self._udp = udp
        udp.setblocking(False)
        relay.watch(udp, selectors.EVENT_READ, self._datagram)

    def _datagram(self, mask):
        try:
            data, sender = self._udp.recvfrom(65535)
        except OSError:
            return
        for association in self.associations:
            if association.accepts(sender):
                association.send(data)
                return

    def send_to(self, data, address):
        try:
            self._udp.sendto(data, address)
        except OSError:
            pass


def _fork_relay():
    """In the holder, once the network is set up: fork the relay of -L and
    -D; the tool's end of the channel to it."""
    tool_end, relay_end = _Channel.pair()
    pid = os.fork()
    if pid == 0:
        tool_end.close()
        _run_relay(relay_end)
    relay_end.close()
    return tool_end


def _run_relay(channel):
    """The relay process, in the application's namespaces: takes its
    forwards from the tool ({"forwards": [...]}, with the listening sockets
    made outside), checks that -L's names resolve, makes -R's listening
    sockets and sends them out ({"forwarding": [...]}), then relays until
    the tool goes. Never returns."""
    status = 125
    try:
        _die_with_parent(None)  # the holder, outside this PID namespace
        import gc

        gc.enable()
        _close_private_descriptors(keep=channel.fileno())
        message, fds = channel.receive()
        if message is None:
            os._exit(0)
        relay = _Relay()
        lines, outgoing = _inside_forwards(relay, message, fds)
        _drop_capabilities()  # after binding: -R may want a port below 1024
        channel.send({"forwarding": lines}, fds=[sock.fileno() for sock in outgoing])
        for sock in outgoing:
            sock.close()
        relay.run(channel)
        status = 0
    except BaseException as e:  # noqa: BLE001 - the tool prints it as one line
        _report_failure(channel, e)
    finally:
        os._exit(status)


def _inside_forwards(relay, message, fds):
    """The relay's side of `message`'s forwards: (lines to show, the -R
    listening sockets for the tool)."""
    import socket

    fds = list(fds)
    lines, outgoing = [], []
    for spec in (_ForwardSpec(**fields) for fields in message["forwards"]):
        if spec.option == "-R":
            sock = _listen(spec, spec.bind_host or message["tunnel_address"])
            lines.append(f"{_bound_text(sock)} in the namespace -> "
                         f"{_Endpoint(spec.host, spec.port)}")
            outgoing.append(sock)
            continue
        listener = socket.socket(fileno=fds.pop(0))
        if spec.option == "-D":
            relay.add_socks(listener, socket.socket(fileno=fds.pop(0)))
            lines.append(f"{_bound_text(listener)} -> SOCKS5 in the namespace")
            continue
        try:
            socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise TunnelError(f"-L {spec.text}: {spec.host} does not resolve in the "
                              f"application's namespace: {e.strerror}") from None
        relay.add_port_forward(listener, spec.host, spec.port,
                               lambda line, spec=spec: _announce(spec, line))
        lines.append(f"{_bound_text(listener)} -> {_Endpoint(spec.host, spec.port)}")
    return lines, outgoing


def _relay_thread(relay, stop):
    """The -R relay in a thread of the tool, which leaves signals to the main thread."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    relay.run(stop)


def _announce(spec, line):
    print(f"sinfonia-tier3: {spec.option} {spec.text}: {line}", file=sys.stderr, flush=True)


class _Forwards:
    """The forwards of one session, as the tool holds them: the listening
    sockets here are made at construction (before deploying), `start()`
    hands them to the relay in the namespace and starts the -R relay here,
    `close()` ends them (after the namespace, which takes the relay along)."""

    def __init__(self, specs):
        import socket

        if len(specs) > _MAX_FORWARDS:
            raise UsageError(f"at most {_MAX_FORWARDS} forwards")
        self.specs = list(specs)
        self._sockets = []  # for the relay, in the order of the specs
        self._channel = None
        self._lines = []
        self._thread = None
        self._stop = None
        try:
            for spec in self.specs:
                if spec.option != "-R":
                    host = spec.bind_host or "127.0.0.1"
                    self._sockets.append(_listen(spec, host))
                    if spec.option == "-D":
                        self._sockets.append(_listen(spec, host, socket.SOCK_DGRAM))
        except BaseException:
            self.close()
            raise

    def start(self, channel, tunnel_address):
        """Hand the forwards to the relay over `channel`; returns once they
        all listen (`tell()` says so)."""
        import socket
        import threading

        self._channel = channel
        channel.send({"forwards": [spec.as_message() for spec in self.specs],
                      "tunnel_address": tunnel_address},
                     fds=[sock.fileno() for sock in self._sockets])
        for sock in self._sockets:  # the relay's now: they close when it ends
            sock.close()
        self._sockets = []
        message, fds = channel.receive(_SETUP_TIMEOUT)
        if message is None or "error" in message:
            for fd in fds:
                os.close(fd)
            raise TunnelError(message["error"] if message else
                              "the relay of the forwards ended unexpectedly")
        remote = [spec for spec in self.specs if spec.option == "-R"]
        if remote:
            relay = _Relay()
            for spec, fd in zip(remote, fds):
                relay.add_port_forward(socket.socket(fileno=fd), spec.host, spec.port,
                                       lambda line, spec=spec: _announce(spec, line))
            self._stop = socket.socketpair()
            self._thread = threading.Thread(target=_relay_thread, args=(relay, self._stop[1]),
                                            daemon=True, name="sinfonia-tier3 -R relay")
            self._thread.start()
        self._lines = message["forwarding"]

    def tell(self):
        """Say on stderr what each forward listens on and where it goes."""
        for line in self._lines:
            print(f"sinfonia-tier3: forwarding {line}", file=sys.stderr, flush=True)

    def serve(self, namespace, tick=None):
        """Without a COMMAND: keep the forwards until SIGINT, SIGTERM or
        SIGHUP (then 0), or until the relay or the `namespace` fails (its
        one line); `tick()`, when given, runs every _TICK s meanwhile
        (`_TunnelKeeper.tick`), and the namespace's answers to it are told."""
        import select
        import signal

        class Stop(Exception):
            pass

        def stop(signum, frame):
            raise Stop(signum)

        handlers = {signum: signal.signal(signum, stop)
                    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self.tell()  # now: a signal from whoever saw it stops the forwards with 0
            while True:
                readable = select.select([self._channel, namespace.channel], [], [],
                                         None if tick is None else _TICK)[0]
                if self._channel in readable:
                    message, _ = self._channel.receive()
                    break
                if namespace.channel in readable:
                    message, _ = namespace.channel.receive()
                    if message is None or "reconfigured" not in message:
                        break
                    namespace.tell_reconfigured(message)
                elif tick is not None:
                    tick()
        except Stop as e:
            print(f"sinfonia-tier3: {signal.Signals(e.args[0]).name}: closing the forwards",
                  file=sys.stderr, flush=True)
            return 0
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        raise TunnelError(message["error"] if message else
                          "the relay of the forwards ended unexpectedly")

    def close(self):
        """Stop the -R relay and close what is still open here."""
        if self._thread is not None:
            self._stop[0].close()
            self._thread.join(timeout=5)
            self._stop[1].close()
            self._thread = None
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        self._channel = None  # the namespace's, which closes it


# Orchestration ###############################################################


class _Candidate(namedtuple("_Candidate", "deployment source round_trip")):
    """A deployment offered by `source`, the Tier 1 or Tier 2 URL asked;
    `round_trip` its cloudlet's handshake in seconds, None when it did not
    answer or candidates were not ranked (there was one)."""

    __slots__ = ()


def _rank_candidates(candidates, keypair, connect_timeout, *, wait_for_all=False,
                     debug=False):
    """Several `candidates` in the order of their cloudlets' handshakes, all
    tried at once: those that answered by round trip, then the others in the
    order offered. `wait_for_all` measures every one (--json), else the
    first answer settles it. TunnelError when none answers."""
    if len(candidates) < 2:
        return candidates
    outcomes = _handshake_round_trips(
        keypair.private, [c.deployment.tunnel_config for c in candidates],
        connect_timeout, wait_for_all=wait_for_all)
    measured = []
    for candidate, outcome in zip(candidates, outcomes):
        answered = isinstance(outcome, float)
        if debug:
            _debug(f"handshake with {candidate.deployment.tunnel_config.endpoint} "
                   f"({candidate.deployment.deployment_name or candidate.source}): "
                   + (f"{outcome * 1000:.1f} ms" if answered else outcome))
        measured.append(candidate._replace(round_trip=outcome if answered else None))
    ranked = sorted((c for c in measured if c.round_trip is not None),
                    key=lambda c: c.round_trip)
    if not ranked:
        raise TunnelError(
            f"none of the {len(candidates)} candidate cloudlets answered a WireGuard "
            f"handshake within {connect_timeout:g} s: check that UDP to them gets "
            "through, or allow more time with --connect-timeout")
    return ranked + [c for c in measured if c.round_trip is None]


def _deployments_json(candidates, keypair):
    """The --json document: the server's fields plus this client's public key,
    and when they were ranked each one's handshake round trip (HandshakeMs,
    null for none)."""
    import json

    documents = []
    for candidate in candidates:
        document = candidate.deployment.as_json()
        document["ClientPublicKey"] = _key_text(keypair.public)
        if len(candidates) > 1:
            trip = candidate.round_trip
            document["HandshakeMs"] = None if trip is None else round(trip * 1000, 1)
        documents.append(document)
    return json.dumps(documents, indent=2)


def _segno():
    """The optional QR code library, or one line saying how to get it."""
    try:
        import segno
    except ImportError:
        raise UnavailableError(
            "--qrcode needs segno: pip install segno (this project's qr extra)"
        ) from None
    return segno


def _check_android_packages(names):
    """--qrcode's COMMAND: Android package names (`org.example.app`), which
    go into the QR code's IncludedApplications line as they are."""
    import re

    for name in names:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*", name):
            raise UsageError(f"--qrcode: {name!r} is not an Android package name "
                             "(such as org.example.app)")


def _print_qrcode(text, style):
    """`text` as a terminal QR code, `compact` (half blocks) or `alt` (emoji
    squares), as upstream draws it for the WireGuard Android app."""
    code = _segno().make(text, mode="byte", encoding="utf-8", eci=True)
    if style == "compact":
        code.terminal(out=sys.stdout, compact=True)
    else:
        code.save(sys.stdout, kind="txt", dark="⬛", light="⬜")
    sys.stdout.flush()


def _write_config_files(config, keypair):
    """--config-debug: wg.conf and resolv.conf in the current directory."""
    for name, text in (
        ("wg.conf", _render_wg_quick(config, keypair)),
        ("resolv.conf", _render_resolv_conf(config)),
    ):
        try:
            _write_atomically(name, text)
        except OSError as e:
            raise SinfoniaError(f"cannot write {name}: {e.strerror}") from None
    print("sinfonia-tier3: wrote wg.conf and resolv.conf", file=sys.stderr)


def _why_no_kernel_wireguard(proc="/proc", sys_module="/sys/module"):
    """Why this kernel makes no WireGuard links, or None when it does: try
    one (root only). A kernel
    that loads no modules (no /proc/modules) and has no WireGuard built in (no
    /sys/module/wireguard) is known to have none without loading pyroute2."""
    if not os.path.exists(os.path.join(proc, "modules")) and \
            not os.path.exists(os.path.join(sys_module, "wireguard")):
        return "the kernel has no WireGuard (none built in, and no module support)"
    import secrets

    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    name = "st3probe" + secrets.token_hex(3)
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=name, kind="wireguard")
        except NetlinkError as e:
            return f"the kernel has no WireGuard ({os.strerror(e.code)})"
        ipr.link("del", ifname=name)
    return None


def _userspace_blocked():
    """Why the userspace backend cannot work for this user, or None: no user
    namespaces, or no /dev/net/tun it may open."""
    for path, blocked in (("/proc/sys/kernel/unprivileged_userns_clone", "0"),
                          ("/proc/sys/user/max_user_namespaces", "0"),
                          ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1")):
        try:
            with open(path) as f:
                if f.read().strip() == blocked:
                    return f"user namespaces are disabled ({path} is {blocked})"
        except OSError:
            pass
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "/dev/net/tun is not readable and writable for this user"
    return None


def _choose_tunnel(requested, *, debug=False):
    """The backend for `--tunnel` `requested` ("auto", "userspace", "kernel"):
    under auto, kernel when already root and the kernel has WireGuard, else
    userspace when /dev/net/tun can be opened, else kernel through sudo.
    The choice and why go to stderr with `debug`; turning to sudo is always
    told, with what failed, since sudo may then ask or refuse."""
    if requested != "auto":
        return requested
    if os.geteuid() == 0:
        why_not = _why_no_kernel_wireguard()
        if why_not is None:
            choice, why = "kernel", "running as root and the kernel has WireGuard"
        else:
            choice, why = "userspace", f"running as root but {why_not}"
    else:
        why_not = _userspace_blocked()
        if why_not is None:
            choice, why = "userspace", "/dev/net/tun can be opened"
        else:
            choice, why = "kernel", f"{why_not}: kernel WireGuard through sudo"
            if not debug:
                print(f"sinfonia-tier3: the userspace tunnel cannot work ({why_not}); "
                      "trying the kernel's WireGuard through sudo", file=sys.stderr)
    if debug:
        _debug(f"--tunnel auto: {choice} ({why})")
    return choice


_RETRY_FIRST, _RETRY_MOST = _REKEY_TIMEOUT, 30.0  # seconds between recovery attempts
_WORKER_RESTART_SPACING = 1.0  # seconds at least between restarts of a datapath


def _config_changes(old, new):
    """What differs between two TunnelConfigs, in words."""
    changes = []
    if new.public_key != old.public_key:
        changes.append("new cloudlet key")
    if new.endpoint != old.endpoint:
        changes.append(f"endpoint {new.endpoint}")
    if new.addresses != old.addresses:
        changes.append("address " + " ".join(str(a) for a in new.addresses))
    if new.allowed_ips != old.allowed_ips:
        changes.append("allowed IPs " + " ".join(str(n) for n in new.allowed_ips))
    if (new.nameservers, new.search_domains) != (old.nameservers, old.search_domains):
        changes.append("DNS")
    return changes


class _TunnelKeeper:
    """Keeps a running session's tunnel up, for as long as the application
    runs (`tick()`, called every _TICK s by `_Tunnel.run`).

    A tunnel is lost when the backend says so (`trouble()`: a handshake
    unanswered for _HANDSHAKE_LOST_AFTER s, data for _DATA_LOST_AFTER s).
    Then, until the cloudlet answers a handshake again: deploy again with
    the same key (which gives the same deployment back, or a new one where
    it expired), point the tunnel at what came back, with the endpoint's
    name resolved again, and move the application's addresses, routes and
    DNS where they changed; attempts are _RETRY_FIRST s apart, doubling up
    to _RETRY_MOST. A datapath worker that ends is replaced at once (a new
    handshake) without deploying again, at most once a second.
    Each event is one line on stderr; nothing is fatal.
    """

    def __init__(self, backend, deployment, redeploy):
        self.backend = backend
        self.deployment = deployment
        self.redeploy = redeploy  # () -> the deployment Tier 1 gives now
        self.lost_at = None
        self.next_attempt = 0.0
        self.spacing = _RETRY_FIRST
        self.last_restart = -1e9

    def tick(self):
        now = time.monotonic()
        if self.lost_at is not None:
            if self.backend.handshake_done():
                print(f"sinfonia-tier3: tunnel back after {now - self.lost_at:.0f} s",
                      file=sys.stderr)
                self.lost_at = None
                self.spacing = _RETRY_FIRST
            elif now >= self.next_attempt:
                self._attempt(now)
            return
        trouble = self.backend.trouble()
        if trouble is None:
            return
        if isinstance(trouble, _WorkerEndedError):
            if now - self.last_restart < _WORKER_RESTART_SPACING:
                return  # ended again at once: not in a busy loop
            self.last_restart = now
            try:
                self.backend.apply(self.deployment.tunnel_config)
            except TunnelError as e:
                print(f"sinfonia-tier3: tunnel lost: {trouble}, and the datapath cannot "
                      f"start again: {e}", file=sys.stderr)
                self.lost_at, self.next_attempt = now, now + self.spacing
            else:
                print(f"sinfonia-tier3: {trouble}; datapath restarted", file=sys.stderr)
            return
        print(f"sinfonia-tier3: tunnel lost: {trouble}; deploying again", file=sys.stderr)
        self.lost_at = now
        self._attempt(now)

    def _attempt(self, now):
        self.next_attempt = now + self.spacing
        retry = f"trying again in {self.spacing:g} s"
        self.spacing = min(2 * self.spacing, _RETRY_MOST)
        old = self.deployment.tunnel_config
        try:
            deployment = self.redeploy()
        except SinfoniaError as e:
            print(f"sinfonia-tier3: deploying again failed: {e}; {retry}", file=sys.stderr)
            deployment = self.deployment  # its endpoint's name may resolve elsewhere now
        config = deployment.tunnel_config
        try:
            address = self.backend.apply(config)
        except TunnelError as e:
            print(f"sinfonia-tier3: cannot point the tunnel at {config.endpoint}: {e}; "
                  f"{retry}", file=sys.stderr)
            return
        try:
            self.backend.namespace.reconfigure(config.addresses, config.allowed_ips,
                                               _resolv_conf_or_none(config))
        except TunnelError as e:  # the application is ending, say
            print(f"sinfonia-tier3: cannot change the application's network: {e}",
                  file=sys.stderr)
        if deployment is not self.deployment:
            changes = _config_changes(old, config) or ["nothing changed"]
            if address != config.endpoint.host:
                changes.append(f"{config.endpoint.host} at {address}")
            print(f"sinfonia-tier3: deployed again {deployment.deployment_name or deployment.uuid} "
                  f"({deployment.status}): {', '.join(changes)}", file=sys.stderr)
        self.deployment = deployment


def _show_deployment(tier1_url, uuid, command, *, results=1, timeout=_DEFAULT_TIMEOUT,
                     debug=False, as_json=False, config_debug=False, qrcode=None,
                     hints=None, zeroconf=False, zeroconf_timeout=_DEFAULT_ZEROCONF_TIMEOUT,
                     connect_timeout=_DEFAULT_CONNECT_TIMEOUT):
    """Deploy `uuid` and show the deployment without starting anything: as
    JSON (--json), as wg.conf and resolv.conf (--config-debug), as a QR code
    whose IncludedApplications are `command` (--qrcode); the exit status."""
    if qrcode is not None:
        if qrcode not in ("compact", "alt"):
            raise UsageError(f"qrcode: expected 'compact' or 'alt', got {qrcode!r}")
        _check_android_packages(command)
        _segno()  # before deploying: the deployment would be wasted
    keypair = _load_or_create_keypair(uuid)
    if _SessionSocket(uuid).running():
        print(f"sinfonia-tier3: a session of {uuid} runs here with this key: a "
              "tunnel made from this deployment takes its peer from that session",
              file=sys.stderr)
    candidates = _deploy_verbosely(
        tier1_url, uuid, keypair, results=results, timeout=timeout, debug=debug,
        hints=hints, zeroconf=zeroconf, zeroconf_timeout=zeroconf_timeout,
        connect_timeout=connect_timeout, wait_for_all=as_json)
    config = candidates[0].deployment.tunnel_config
    if as_json:
        print(_deployments_json(candidates, keypair), flush=True)
    if config_debug:
        _write_config_files(config, keypair)
    if qrcode:
        _print_qrcode(_render_wg_quick(config, keypair, command), qrcode)
    return 0


def _run_session(tier1_url, uuid, command, *, results=1, timeout=_DEFAULT_TIMEOUT,
                 debug=False, mtu=_DEFAULT_MTU, connect_timeout=_DEFAULT_CONNECT_TIMEOUT,
                 tunnel="auto", hints=None, zeroconf=False,
                 zeroconf_timeout=_DEFAULT_ZEROCONF_TIMEOUT, wait_for=(),
                 ready_timeout=_DEFAULT_READY_TIMEOUT, reconnect=True, forwards=()):
    """Deploy `uuid` and run `command` behind the tunnel to it, once each
    (host, port) of `wait_for` answers; the application's exit status. Under
    `--tunnel auto`, a userspace tunnel that fails in the namespace itself
    gives way to the kernel's through sudo. With `reconnect` a
    `_TunnelKeeper` keeps the tunnel up meanwhile, deploying again where the
    chosen deployment came from. With `forwards` (`_ForwardSpec`s) they
    serve while `command` runs, or without a command until a signal stops
    them (status 0). Where a session of `uuid` runs already, `command`
    joins it instead."""
    import contextlib

    sessions = _SessionSocket(uuid)
    if forwards and sessions.running():
        raise SinfoniaError(f"a session of {uuid} runs here already: -L, -D and -R "
                            "are set up by the session that deploys, not by one that joins")
    joined = sessions.join(command)
    if joined is not None:
        return joined
    with contextlib.ExitStack() as cleanup:  # on the way out: backend, forwards, socket
        cleanup.callback(sessions.close)
        choice = _choose_tunnel(tunnel, debug=debug)
        forwarding = _Forwards(forwards)  # before deploying: a port in use fails now
        cleanup.callback(forwarding.close)
        relay = bool(forwards)
        backend = _TUNNELS[choice](mtu=mtu, relay=relay)  # sets up while Tier 1 answers
        cleanup.callback(lambda: backend.close())  # the backend the session ends with
        keypair = _load_or_create_keypair(uuid)
        chosen = _deploy_verbosely(
            tier1_url, uuid, keypair, results=results, timeout=timeout, debug=debug,
            hints=hints, zeroconf=zeroconf, zeroconf_timeout=zeroconf_timeout,
            connect_timeout=connect_timeout)[0]
        deployment = chosen.deployment
        config = deployment.tunnel_config
        try:
            backend.connect(config, keypair, connect_timeout=connect_timeout, debug=debug)
        except _InterfaceFailedError as e:
            if tunnel != "auto" or choice != "userspace" or os.geteuid() == 0:
                raise
            print(f"sinfonia-tier3: the userspace tunnel failed ({e}); trying the "
                  "kernel's WireGuard through sudo", file=sys.stderr)
            backend.close()
            backend = _KernelTunnel(mtu=mtu, relay=relay)
            backend.connect(config, keypair, connect_timeout=connect_timeout, debug=debug)
        backend.wait_for(wait_for, ready_timeout, debug=debug)
        tick = None
        if reconnect:
            tick = _TunnelKeeper(backend, deployment, lambda: _request_deployments(
                chosen.source, uuid, keypair, results=1, timeout=timeout, debug=debug,
                hints=hints)[0]).tick
        environment = _application_environment(deployment, chosen.source)
        if forwards:
            forwarding.start(backend.namespace.relay, str(config.addresses[0].ip))
            if not command:
                backend.namespace.serve_without_application(sessions.listener, environment)
                return forwarding.serve(backend.namespace, tick)
            forwarding.tell()
        return backend.run(command, environment, tick, sessions.listener)


def _application_environment(deployment, tier1_url):
    """The SINFONIA_* variables that tell the application where it runs
    (`tier1_url`: the URL that offered the deployment)."""
    return {
        "SINFONIA_DEPLOYMENT": deployment.deployment_name,
        "SINFONIA_UUID": deployment.uuid,
        "SINFONIA_ADDRESS": " ".join(
            str(a.ip) for a in deployment.tunnel_config.addresses),
        "SINFONIA_TIER1_URL": tier1_url,
    }


def _deploy_verbosely(tier1_url, uuid, keypair, *, results, timeout, debug, hints=None,
                      zeroconf=False, zeroconf_timeout=_DEFAULT_ZEROCONF_TIMEOUT,
                      connect_timeout=_DEFAULT_CONNECT_TIMEOUT, wait_for_all=False):
    """The `_Candidate`s for `uuid` (from the Tier 2s zeroconf finds, else
    from the Tier 1), ranked by handshake when there are several; the chosen
    one first, told on stderr."""
    print(f"sinfonia-tier3: deploying {uuid}...", file=sys.stderr)
    offered = _offered_deployments(
        tier1_url, uuid, keypair, results=results, timeout=timeout, debug=debug,
        hints=hints, zeroconf=zeroconf, zeroconf_timeout=zeroconf_timeout)
    candidates = _rank_candidates(
        [_Candidate(deployment, source, None) for deployment, source in offered],
        keypair, connect_timeout, wait_for_all=wait_for_all, debug=debug)
    chosen = candidates[0].deployment
    config = chosen.tunnel_config
    print(
        f"sinfonia-tier3: deployed {chosen.deployment_name or chosen.uuid} "
        f"({chosen.status}), tunnel endpoint {config.endpoint}",
        file=sys.stderr,
    )
    if debug:
        import json

        _debug(f"chosen deployment: {json.dumps(chosen.as_json())}")
    return candidates


def sinfonia_tier3(
    tier1_url,
    application_uuid,
    application,
    config_debug=False,
    debug=False,
    qrcode=None,
    zeroconf=False,
):
    """Upstream 0.7.4's entry point, same signature: deploy `application_uuid`
    from `tier1_url` and run `application` (a command list) through the
    tunnel; returns the exit status, after printing the one line on failure."""
    try:
        uuid, command = _application_uuid(str(application_uuid)), list(application)
        hints = _client_hints()
        if config_debug or qrcode is not None:
            return _show_deployment(str(tier1_url), uuid, command, debug=debug,
                                    config_debug=config_debug, qrcode=qrcode,
                                    hints=hints, zeroconf=zeroconf)
        return _run_session(str(tier1_url), uuid, command, debug=debug, hints=hints,
                            zeroconf=zeroconf)
    except SinfoniaError as e:
        print(f"sinfonia-tier3: {e}", file=sys.stderr)
        return e.exit_status


# Command line ################################################################

_EXIT_STATUS_HELP = """\
exit status:
  0        success (with a COMMAND: the application's own status)
  128+N    the application was killed by signal N; also the tool's own
           status when a signal ends it first: 130 for Ctrl-C before the
           application starts (SIGINT), 141 when the reader of --json or
           --qrcode goes away (SIGPIPE)
  2        usage error
  125      failure of sinfonia-tier3 itself (Tier 1 unreachable, timed out,
           refused or answered badly; key cache unusable; tunnel failed; no
           candidate cloudlet answered; backend not ready for --wait-for)
  126      COMMAND found but not executable
  127      COMMAND not found

APPLICATION is a backend uuid or the alias helloworld. Progress goes to
stderr; stdout belongs to the application (or to --json / --qrcode). With
-L, -D or -R and no COMMAND no shell starts: the forwards serve until
SIGINT, SIGTERM or SIGHUP, then the tool exits 0. Where a session of
APPLICATION runs already, COMMAND joins it: it runs through that session's
tunnel, which stays up until its last command ends.
"""


def _argument_parser():
    """The command line; argparse exits 2 on bad arguments."""
    import argparse
    import functools

    def tier1_url(text):
        if not text.startswith(("http://", "https://")) or len(text) < 9:
            raise argparse.ArgumentTypeError("expected an http:// or https:// URL")
        return text

    def application(text):
        try:
            return _application_uuid(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def seconds(text):
        try:
            value = float(text)
        except ValueError:
            value = 0
        if not 0 < value < 86400:
            raise argparse.ArgumentTypeError(f"{text!r}: expected seconds > 0")
        return value

    def mtu(text):
        if not text.isdigit() or not _MIN_MTU <= int(text) <= 65535:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a whole number from {_MIN_MTU} to 65535")
        return int(text)

    def forward(option, text):
        try:
            return _parse_forward(option, text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)[len(option) + 1:]) from None  # argparse names it

    def count(text):
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= _MAX_RESULTS:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a whole number from 1 to {_MAX_RESULTS}")
        return int(text)

    def service(text):
        try:
            return _host_port(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None

    parser = argparse.ArgumentParser(
        prog="sinfonia-tier3",
        usage="%(prog)s [options] TIER1_URL APPLICATION [--] [COMMAND [ARGS...]]",
        # python -OO drops docstrings: then --help goes without this line
        description=__doc__ and __doc__.split("\n\n")[0].replace("\n", " "),
        epilog=_EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the request URL, HTTP status, timings and chosen deployment",
    )
    parser.add_argument(
        "--config-debug",
        action="store_true",
        help="write wg.conf and resolv.conf to the current directory and exit",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the deployments as JSON on stdout and exit; failures as "
        '{"error": {"kind": ..., "message": ...}}',
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=_DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="deadline for the whole Tier 1 exchange (default %(default)g)",
    )
    parser.add_argument(
        "--results",
        type=count,
        default=1,
        metavar="N",
        help=f"how many candidate deployments to ask for, 1 to {_MAX_RESULTS} (default 1); "
        "of several, the one whose cloudlet completes a WireGuard handshake first is "
        "used (all are tried at once)",
    )
    parser.add_argument(
        "--zeroconf",
        action="store_true",
        help="deploy on the Tier 2s that announce themselves by mDNS on the local "
        "network; TIER1_URL only when none answers",
    )
    parser.add_argument(
        "--zeroconf-timeout",
        type=seconds,
        default=_DEFAULT_ZEROCONF_TIMEOUT,
        metavar="SECONDS",
        help="how long to collect mDNS answers (default %(default)g)",
    )
    parser.add_argument(
        "--location",
        metavar="LAT,LON",
        help="tell Tier 1 where the client is (X-Location), to find a cloudlet near "
        "it (default $SINFONIA_LOCATION)",
    )
    parser.add_argument(
        "--client-ip",
        metavar="ADDR",
        help="tell Tier 1 the client's own address (X-ClientIP), for cloudlets that "
        "serve its local network (default $SINFONIA_CLIENT_IP)",
    )
    parser.add_argument(
        "--wait-for",
        type=service,
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="start COMMAND only once a TCP connection to HOST:PORT succeeds from "
        "inside the namespace (HOST resolved by the cloudlet's DNS); repeatable",
    )
    parser.add_argument(
        "--ready-timeout",
        type=seconds,
        default=_DEFAULT_READY_TIMEOUT,
        metavar="SECONDS",
        help="how long --wait-for waits before giving up without starting COMMAND "
        "(default %(default)g)",
    )
    parser.add_argument(
        "--mtu",
        type=mtu,
        default=_DEFAULT_MTU,
        help="MTU of the application's tunnel interface (default %(default)d)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=seconds,
        default=_DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the cloudlet's first WireGuard handshake before "
        "giving up without starting COMMAND (default %(default)g)",
    )
    parser.add_argument(
        "--tunnel",
        choices=["auto", "userspace", "kernel"],
        default="auto",
        help="WireGuard backend: userspace (rootless, built in), kernel (as root, "
        "or through a sudo helper), or auto: kernel when root and the kernel has "
        "WireGuard, else userspace when /dev/net/tun opens, else kernel through "
        "sudo (default %(default)s)",
    )
    def add_forward(option, metavar, help):
        parser.add_argument(option, dest="forwards", action="append", default=[],
                            metavar=metavar, type=functools.partial(forward, option),
                            help=help + "; repeatable")

    add_forward("-L", "[BIND_ADDRESS:]PORT:HOST:HOSTPORT",
                "listen on BIND_ADDRESS:PORT here (default 127.0.0.1) and carry each "
                "connection to HOST:HOSTPORT in the application's namespace, HOST "
                "resolved by the cloudlet's DNS")
    add_forward("-D", "[BIND_ADDRESS:]PORT",
                "a SOCKS5 proxy on BIND_ADDRESS:PORT here (default 127.0.0.1) whose "
                "connections and UDP go out from the application's namespace, names "
                "resolved there")
    add_forward("-R", "[BIND_ADDRESS:]PORT:HOST:HOSTPORT",
                "listen on BIND_ADDRESS:PORT in the application's namespace (default "
                "the tunnel address) and carry each connection to HOST:HOSTPORT here")
    parser.add_argument(
        "--no-reconnect",
        action="store_true",
        help="leave a lost tunnel lost: by default, while COMMAND runs, a tunnel "
        "whose cloudlet stops answering (for 10 s to a handshake, 15 s to data) "
        "is deployed again and moved to the new key, endpoint, address and DNS, "
        "and a datapath that fails is restarted, each told in one line on stderr",
    )
    parser.add_argument(
        "--qrcode",
        choices=["compact", "alt"],
        help="print the tunnel as a QR code for the WireGuard Android app and exit",
    )
    parser.add_argument("tier1_url", metavar="TIER1_URL", type=tier1_url)
    parser.add_argument("application", metavar="APPLICATION", type=application)
    parser.add_argument("command", metavar="COMMAND", nargs=argparse.REMAINDER)
    return parser


def main(argv=None):
    """Entry point of the `sinfonia-tier3` script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_ROOT_HELPER_FLAG]:
        return _root_helper_main(argv[1:], sys.stdin.buffer)
    options = _argument_parser().parse_args(argv)
    command = options.command
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        common = {"results": options.results, "timeout": options.timeout,
                  "debug": options.debug, "connect_timeout": options.connect_timeout,
                  "hints": _client_hints(options.location, options.client_ip),
                  "zeroconf": options.zeroconf,
                  "zeroconf_timeout": options.zeroconf_timeout}
        if options.json or options.config_debug or options.qrcode:
            if options.forwards:
                raise UsageError("-L, -D and -R need a session: not with --json, "
                                 "--config-debug or --qrcode")
            return _show_deployment(
                options.tier1_url, options.application, command, as_json=options.json,
                config_debug=options.config_debug, qrcode=options.qrcode, **common)
        return _run_session(
            options.tier1_url, options.application, command, mtu=options.mtu,
            tunnel=options.tunnel, wait_for=options.wait_for,
            ready_timeout=options.ready_timeout, reconnect=not options.no_reconnect,
            forwards=options.forwards, **common)
    except SinfoniaError as e:
        print(f"sinfonia-tier3: {e}", file=sys.stderr)
        if options.json:
            import json

            print(json.dumps({"error": {"kind": e.kind, "message": str(e)}}))
        return e.exit_status
    except KeyboardInterrupt:
        import signal

        print("sinfonia-tier3: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT  # as if the signal had ended it, like a shell says
    except BrokenPipeError:
        # The reader of --json or --qrcode went away (`| head`): end quietly,
        # with the status of a process killed by SIGPIPE.
        import signal

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
