"""sinfonia-tier3: get an edge backend deployed on a nearby cloudlet and run the
application inside a private network namespace whose only way out is a
WireGuard tunnel to that backend, without root.

Usage: sinfonia-tier3 [options] TIER1_URL APPLICATION [--] [COMMAND [ARGS...]]
"""

__version__ = "0.1.0.dev0"

__all__ = [
    "BadResponseError",
    "DeadlineError",
    "Deployment",
    "KeyCacheError",
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
import struct
import sys
from dataclasses import dataclass, field

# Constants and errors ########################################################

_ALIASES = {"helloworld": "00000000-0000-0000-0000-000000000000"}
_USER_AGENT = f"sinfonia-tier3/{__version__}"
_DEFAULT_TIMEOUT = 30.0
_MAX_RESPONSE_BYTES = 1 << 20  # a list of three deployments is about 2 KiB
_MAX_DETAIL_CHARS = 200  # how much of a server's error text reaches the user
_PERSISTENT_KEEPALIVE = 30  # seconds, as upstream configures its peer
_RESOLV_NDOTS = 5  # cluster-local names have up to four dots


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


class UnavailableError(SinfoniaError):
    """A feature that needs something this installation does not have."""

    kind = "unavailable"


def _warn(message):
    """Tell the user about something repaired on the way; stdout is the app's."""
    print(f"sinfonia-tier3: warning: {message}", file=sys.stderr)


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


# Keys and key cache ##########################################################


@dataclass(frozen=True)
class _KeyPair:
    """An X25519 keypair; the private half never leaves its 0600 file."""

    private: bytes = field(repr=False)
    public: bytes


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
    from nacl.bindings import crypto_scalarmult_base

    return crypto_scalarmult_base(private)


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


def _prepare_key_cache_dir(directory):
    """Create `directory` 0700 if missing; refuse one that is not ours."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as e:
        raise KeyCacheError(f"key cache {directory}: {e.strerror}") from None
    import stat

    if not stat.S_ISDIR(info.st_mode):
        raise KeyCacheError(f"key cache {directory}: not a directory (or a symlink)")
    if info.st_uid != os.geteuid():
        raise KeyCacheError(f"key cache {directory}: owned by uid {info.st_uid}")
    if info.st_mode & 0o077:
        os.chmod(directory, 0o700)


def _read_key_file(path):
    """The text of the key file, or None if there is none; refuses
    symlinks, other owners and anything that is not a regular file."""
    import stat

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
            os.fchmod(fd, 0o600)
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


def _store_keypair(path, keypair, replace):
    """Save `keypair` in upstream's format; False if `path` appeared meanwhile
    and `replace` is false."""
    text = (
        f"private_key: {_key_text(keypair.private)}\n"
        f"public_key: {_key_text(keypair.public)}\n"
    )
    try:
        return _write_atomically(path, text, replace)
    except OSError as e:
        raise KeyCacheError(f"key file {path}: {e.strerror}") from None


def _load_or_create_keypair(uuid, cache_dir=None):
    """The keypair cached for application `uuid`, created on first use.

    Reusing it means the Tier 1 hands back the same deployment. `uuid` must
    be canonical (it names a file).
    """
    directory = cache_dir or _key_cache_dir()
    _prepare_key_cache_dir(directory)
    path = os.path.join(directory, uuid)
    for _attempt in range(3):
        text = _read_key_file(path)
        if text is None:
            keypair = _generate_keypair()
            if _store_keypair(path, keypair, replace=False):
                return keypair
            continue  # another run created it meanwhile: use theirs
        try:
            return _parse_key_file(text)
        except ValueError as e:
            _warn(f"key file {path} is unusable ({e}); replacing it with a new key")
            keypair = _generate_keypair()
            _store_keypair(path, keypair, replace=True)
            return keypair
    raise KeyCacheError(f"key file {path}: keeps changing under us")


# Tier 1 client and response validation #######################################


@dataclass(frozen=True)
class TunnelConfig:
    """The WireGuard side of a deployment, validated and parsed."""

    public_key: bytes  # the cloudlet's WireGuard key
    allowed_ips: tuple  # ipaddress networks routed into the tunnel
    endpoint_host: str  # a name, an IPv4 or an IPv6 literal (no brackets)
    endpoint_port: int
    addresses: tuple  # ipaddress interfaces: this client's tunnel addresses
    nameservers: tuple  # ipaddress addresses
    search_domains: tuple  # str

    @property
    def endpoint(self):
        """`host:port`, with an IPv6 host in brackets."""
        if ":" in self.endpoint_host:
            return f"[{self.endpoint_host}]:{self.endpoint_port}"
        return f"{self.endpoint_host}:{self.endpoint_port}"


@dataclass(frozen=True)
class Deployment:
    """One backend deployment offered by the Tier 1."""

    uuid: str  # canonical application uuid
    application_key: bytes  # this client's public key, as the server has it
    status: str
    tunnel_config: TunnelConfig
    deployment_name: str = ""
    created: "str | None" = None

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
                "endpoint": config.endpoint,
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


def _is_domain_name(text):
    """Whether `text` is a syntactically valid DNS name (LDH labels)."""
    import re

    name = text.removesuffix(".")
    return 0 < len(name) <= 253 and all(
        re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", label)
        for label in name.split(".")
    )


class _Validator:
    """Turns the parsed JSON of a deploy answer into Deployments; every
    problem is a BadResponseError naming the field's path."""

    def __init__(self, client_public_key):
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

        public_key = self.key(obj, path, "publicKey")
        allowed_ips = []
        for index, text in enumerate(self.member(obj, path, "allowedIPs", list)):
            try:
                allowed_ips.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                self.fail(f"{path}.allowedIPs[{index}]", "not an IP network")
        if not allowed_ips:
            self.fail(f"{path}.allowedIPs", "empty list")
        host, port = self.endpoint(self.member(obj, path, "endpoint", str), path)
        addresses = []
        for index, text in enumerate(self.member(obj, path, "address", list)):
            try:
                addresses.append(ipaddress.ip_interface(text.strip()))
            except ValueError:
                self.fail(f"{path}.address[{index}]", "not an IP address")
        if not addresses:
            self.fail(f"{path}.address", "empty list")
        nameservers, search_domains = [], []
        for index, text in enumerate(self.member(obj, path, "dns", list)):
            try:
                nameservers.append(ipaddress.ip_address(text.strip()))
            except ValueError:
                if not _is_domain_name(text):
                    self.fail(
                        f"{path}.dns[{index}]", "neither an IP address nor a domain"
                    )
                search_domains.append(text)
        return TunnelConfig(
            public_key=public_key,
            allowed_ips=tuple(allowed_ips),
            endpoint_host=host,
            endpoint_port=port,
            addresses=tuple(addresses),
            nameservers=tuple(nameservers),
            search_domains=tuple(search_domains),
        )

    def endpoint(self, text, path):
        import ipaddress

        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            self.fail(f"{path}.endpoint", "not host:port with a port 1-65535")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                self.fail(f"{path}.endpoint", "not an IPv6 address in brackets")
        elif not _is_domain_name(host):
            self.fail(f"{path}.endpoint", "host is not a name or an IPv4 address")
        return host, int(port)


def _json_type(value):
    """The JSON name of a parsed value's type, for error messages."""
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "list", str: "string", type(None): "null"}
    return names.get(type(value), "number")


def _parse_deployments(body, client_public_key):
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
    except RecursionError:
        raise BadResponseError(
            "bad response from Tier 1: JSON nested too deeply"
        ) from None
    return _Validator(client_public_key).deployments(data)


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
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > _MAX_RESPONSE_BYTES:
        raise BadResponseError(
            f"bad response from Tier 1: a body of {int(length)} bytes, "
            f"more than the {_MAX_RESPONSE_BYTES} allowed"
        )
    chunks, size = [], 0
    while True:
        if clock() > deadline:
            raise DeadlineError("Tier 1 was still sending its answer at the deadline")
        chunk = response.read1(16384)
        if not chunk:
            if length.isdigit() and size < int(length):
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


def _exchange(url, deadline, clock):
    """POST to `url`; (status, reason, headers, body) of whatever answered.

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
        headers={"User-Agent": _USER_AGENT, "Accept": "application/json"},
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


def _post_before(url, timeout, clock):
    """`_exchange` with a hard deadline `timeout` seconds from now.

    Name resolution cannot be interrupted, so the exchange runs in a daemon
    thread that is abandoned, not waited for, when the deadline passes.
    """
    import threading

    deadline = clock() + timeout
    outcome = {}

    def work():
        try:
            outcome["answer"] = _exchange(url, deadline, clock)
        except BaseException as e:  # noqa: BLE001 - re-raised in the waiting thread
            outcome["error"] = e

    worker = threading.Thread(target=work, name="sinfonia-tier1", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise DeadlineError(f"no complete answer from Tier 1 within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["answer"]


def _request_deployments(tier1_url, uuid, keypair, *, results, timeout, debug=False):
    """Ask the Tier 1 to deploy `uuid` for `keypair`; the validated list."""
    import time

    if isinstance(results, bool) or not isinstance(results, int) or results < 1:
        raise UsageError(f"results: expected a whole number >= 1, got {results!r}")
    if not timeout > 0:
        raise UsageError(f"timeout: expected seconds > 0, got {timeout!r}")
    url = _deploy_url(tier1_url, uuid, keypair.public, results)
    if debug:
        _debug(f"POST {url}")
    started = time.monotonic()
    status, reason, headers, body = _post_before(url, timeout, time.monotonic)
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
    return _parse_deployments(body, keypair.public)


def _debug(message):
    """A --debug line on stderr."""
    print(f"sinfonia-tier3: debug: {message}", file=sys.stderr)


def deploy(tier1_url, application, *, results=1, timeout=_DEFAULT_TIMEOUT):
    """Ask the Tier 1 at `tier1_url` to deploy `application` (a uuid or an
    alias) for this user's cached key; returns the offered deployments.

    Raises a SinfoniaError subclass whose message says what went wrong.
    """
    uuid = _application_uuid(application)
    keypair = _load_or_create_keypair(uuid)
    return _request_deployments(
        tier1_url, uuid, keypair, results=results, timeout=timeout
    )


# Tunnel configuration and renderers ##########################################


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


# Orchestration ###############################################################


def _deployments_json(deployments, keypair):
    """The --json document: the server's fields plus this client's public key."""
    import json

    documents = []
    for deployment in deployments:
        document = deployment.as_json()
        document["ClientPublicKey"] = _key_text(keypair.public)
        documents.append(document)
    return json.dumps(documents, indent=2)


def _print_qrcode(text, style):
    """`text` as a terminal QR code, `compact` (half blocks) or `alt` (emoji
    squares), as upstream draws it for the WireGuard Android app."""
    try:
        import segno
    except ImportError:
        raise UnavailableError(
            "--qrcode needs segno: pip install 'sinfonia-tier3[qr]'"
        ) from None
    code = segno.make(text, mode="byte", encoding="utf-8", eci=True)
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


def _run(
    tier1_url,
    uuid,
    command,
    *,
    results=1,
    timeout=_DEFAULT_TIMEOUT,
    config_debug=False,
    debug=False,
    qrcode=None,
    as_json=False,
    zeroconf=False,
):
    """Deploy `uuid` and do what was asked with it; the exit status.

    Raises SinfoniaError for every failure of the tool itself.
    """
    if zeroconf:
        raise UnavailableError(
            "--zeroconf: discovery of a local Tier 2 is not built yet"
        )
    if not (config_debug or qrcode or as_json):
        raise TunnelError(
            "running an application needs the tunnel, which this version cannot "
            "set up yet; --config-debug, --json and --qrcode work"
        )
    if qrcode is not None and qrcode not in ("compact", "alt"):
        raise UsageError(f"qrcode: expected 'compact' or 'alt', got {qrcode!r}")
    keypair = _load_or_create_keypair(uuid)
    print(f"sinfonia-tier3: deploying {uuid}...", file=sys.stderr)
    deployments = _request_deployments(
        tier1_url, uuid, keypair, results=results, timeout=timeout, debug=debug
    )
    chosen = deployments[0]  # until candidates are ranked
    config = chosen.tunnel_config
    print(
        f"sinfonia-tier3: deployed {chosen.deployment_name or chosen.uuid} "
        f"({chosen.status}), tunnel endpoint {config.endpoint}",
        file=sys.stderr,
    )
    if debug:
        import json

        _debug(f"chosen deployment: {json.dumps(chosen.as_json())}")
    if as_json:
        print(_deployments_json(deployments, keypair), flush=True)
    if config_debug:
        _write_config_files(config, keypair)
    if qrcode:
        _print_qrcode(_render_wg_quick(config, keypair, command), qrcode)
    return 0


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
        return _run(
            str(tier1_url),
            _application_uuid(str(application_uuid)),
            list(application),
            config_debug=config_debug,
            debug=debug,
            qrcode=qrcode,
            zeroconf=zeroconf,
        )
    except SinfoniaError as e:
        print(f"sinfonia-tier3: {e}", file=sys.stderr)
        return e.exit_status


# Command line ################################################################

_EXIT_STATUS_HELP = """\
exit status:
  0        success (with a COMMAND: the application's own status)
  128+N    the application was killed by signal N
  2        usage error
  125      failure of sinfonia-tier3 itself (Tier 1 unreachable, timed out,
           refused or answered badly; key cache unusable; tunnel failed)
  126      COMMAND found but not executable
  127      COMMAND not found

APPLICATION is a backend uuid or the alias helloworld. Progress goes to
stderr; stdout belongs to the application (or to --json / --qrcode).
"""


def _argument_parser():
    """The command line of DESIGN §6; argparse exits 2 on bad arguments."""
    import argparse

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

    def count(text):
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
        return int(text)

    parser = argparse.ArgumentParser(
        prog="sinfonia-tier3",
        usage="%(prog)s [options] TIER1_URL APPLICATION [--] [COMMAND [ARGS...]]",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
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
        help="how many candidate deployments to ask for (default 1; the first is used)",
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
    options = _argument_parser().parse_args(argv)
    command = options.command
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        return _run(
            options.tier1_url,
            options.application,
            command,
            results=options.results,
            timeout=options.timeout,
            config_debug=options.config_debug,
            debug=options.debug,
            qrcode=options.qrcode,
            as_json=options.json,
        )
    except SinfoniaError as e:
        print(f"sinfonia-tier3: {e}", file=sys.stderr)
        if options.json:
            import json

            print(json.dumps({"error": {"kind": e.kind, "message": str(e)}}))
        return e.exit_status
    except KeyboardInterrupt:
        print("sinfonia-tier3: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
