"""The Tier 1 client against the test cloudlet: the happy path, every
misbehaviour of a hostile server, and validation of every response field."""

import base64
import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from checkout import REPO
from cloudlet import HELLOWORLD, MISBEHAVIOURS, Cloudlet
from netns import require_programs

import sinfonia_tier3 as st3


def test_deploy_returns_parsed_deployment(cloudlet, key_cache):
    (deployment,) = st3.deploy(cloudlet.url, "helloworld")
    keypair = st3._load_or_create_keypair(HELLOWORLD)
    assert deployment.uuid == HELLOWORLD
    assert deployment.application_key == keypair.public
    assert deployment.status == "Deployed"
    assert deployment.deployment_name.startswith("helloworld-")
    config = deployment.tunnel_config
    assert config.public_key == cloudlet.wireguard.public_key
    assert [str(n) for n in config.allowed_ips] == ["10.0.0.0/16", "10.43.0.0/16"]
    assert str(config.endpoint) == cloudlet.wireguard.endpoint
    assert [str(a) for a in config.addresses] == ["10.0.0.2/32"]
    assert [str(a) for a in config.nameservers] == ["10.43.0.10"]
    assert config.search_domains == (
        "app-00000000.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
    )


def test_same_key_and_uuid_get_the_same_deployment(cloudlet):
    first = st3.deploy(cloudlet.url, "helloworld")
    assert st3.deploy(cloudlet.url, HELLOWORLD) == first


def test_request_has_urlsafe_key_results_and_user_agent(cloudlet):
    st3.deploy(cloudlet.url + "/", "helloworld", results=3)
    method, path, headers = cloudlet.requests[-1]
    public = st3._load_or_create_keypair(HELLOWORLD).public
    key = base64.urlsafe_b64encode(public).decode().rstrip("=")
    assert method == "POST"
    assert path == f"/api/v1/deploy/{HELLOWORLD}/{key}?results=3"
    assert headers["User-Agent"] == f"sinfonia-tier3/{st3.__version__}"


def test_tier1_url_with_a_path_prefix_keeps_it(cloudlet):
    with pytest.raises(st3.RefusedError, match="HTTP 404"):
        st3.deploy(cloudlet.url + "/prefix", "helloworld")
    assert cloudlet.requests[-1][1].startswith("/prefix/api/v1/deploy/")


def test_proxy_from_the_environment_is_used(cloudlet, monkeypatch):
    # The cloudlet plays the proxy: urllib sends it the absolute URL.
    monkeypatch.setenv("http_proxy", cloudlet.url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    (deployment,) = st3.deploy("http://tier1.invalid", "helloworld")
    assert deployment.uuid == HELLOWORLD
    assert cloudlet.requests[-1][1].startswith("http://tier1.invalid/api/v1/deploy/")


def test_unknown_backend_shows_the_problem_detail(cloudlet):
    with pytest.raises(st3.RefusedError) as caught:
        st3.deploy(cloudlet.url, "11111111-2222-3333-4444-555555555555")
    assert str(caught.value) == (
        "Tier 1 refused the deployment: HTTP 404 Not Found: "
        "no backend 11111111-2222-3333-4444-555555555555 on this cloudlet"
    )
    assert caught.value.kind == "refused" and caught.value.exit_status == 125


@pytest.mark.parametrize("key", ["not-a-key", "AAAA", "A" * 44 + "!"])
def test_cloudlet_answers_400_for_a_malformed_key(cloudlet, key):
    request = urllib.request.Request(
        f"{cloudlet.url}/api/v1/deploy/{HELLOWORLD}/{key}", data=b"", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert caught.value.headers["Content-Type"] == "application/problem+json"
    assert "not a WireGuard key" in json.load(caught.value)["detail"]


def test_cloudlet_accepts_standard_base64_and_releases_on_delete(cloudlet):
    key = base64.b64encode(bytes(range(32))).decode()
    url = f"{cloudlet.url}/api/v1/deploy/{HELLOWORLD}/{key}"
    created = json.load(
        urllib.request.urlopen(urllib.request.Request(url, data=b""), timeout=10)
    )
    assert (
        json.load(urllib.request.urlopen(url, timeout=10)) == created
    )  # GET: the same
    delete = urllib.request.Request(url, method="DELETE")
    assert urllib.request.urlopen(delete, timeout=10).status == 204
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(url, timeout=10)


# What the user is told for each kind of hostile server. The deadline given
# is short so that the slow ones show it is kept.
EXPECTED_FAILURES = {
    "close": (st3.BadResponseError, "closed the connection without answering"),
    "garbage": (st3.BadResponseError, "not HTTP"),
    "redirect": (st3.RefusedError, "HTTP 302, a redirect to https://elsewhere.invalid/"),
    "html": (st3.BadResponseError, "text/html instead of JSON"),
    "text": (st3.BadResponseError, "text/plain instead of JSON"),
    "html-error": (st3.RefusedError, "HTTP 502 Bad Gateway: (an HTML page)"),
    "text-error": (
        st3.RefusedError,
        "HTTP 503 Service Unavailable: upstream connect error",
    ),
    "problem": (
        st3.RefusedError,
        "HTTP 500 Internal Server Error: Something went wrong x",
    ),
    "truncated": (st3.BadResponseError, "JSON cut short"),
    "short-body": (st3.BadResponseError, "body cut short, 100 of"),
    "wrong-type": (st3.BadResponseError, "deployments: expected a list, got object"),
    "empty-list": (st3.BadResponseError, "deployments: empty list"),
    "empty-body": (st3.BadResponseError, "empty body"),
    "not-utf8": (st3.BadResponseError, "body is not UTF-8"),
    "huge": (st3.BadResponseError, "more than the 1048576 allowed"),
    "huge-unannounced": (st3.BadResponseError, "body larger than 1048576 bytes"),
    "long-length": (st3.BadResponseError, "more than the 1048576 allowed"),
    # http.client reads to the end when int() refuses the length: a good answer
    "odd-length": (None, None),
    "endless": (st3.DeadlineError, "within 1.5 s"),
    "slow-headers": (st3.DeadlineError, "within 1.5 s"),
}


def test_every_misbehaviour_has_an_expected_failure():
    assert set(EXPECTED_FAILURES) == set(MISBEHAVIOURS)


@pytest.mark.parametrize("misbehaviour", sorted(EXPECTED_FAILURES))
def test_hostile_server_gives_one_short_line(cloudlet, misbehaviour):
    error_class, message = EXPECTED_FAILURES[misbehaviour]
    cloudlet.misbehaviour = misbehaviour
    if error_class is None:
        assert st3.deploy(cloudlet.url, "helloworld", timeout=1.5)
        return
    started = time.monotonic()
    with pytest.raises(st3.SinfoniaError) as caught:
        st3.deploy(cloudlet.url, "helloworld", timeout=1.5)
    elapsed = time.monotonic() - started
    line = str(caught.value)
    assert type(caught.value) is error_class
    assert message in line
    assert "\n" not in line and "line two" not in line and len(line) < 300
    assert all(c.isprintable() for c in line)
    assert elapsed < 1.5 + 2.0  # the deadline holds (with room for a loaded machine)


def test_problem_detail_is_cleaned_and_shortened(cloudlet):
    cloudlet.misbehaviour = "problem"
    with pytest.raises(st3.RefusedError) as caught:
        st3.deploy(cloudlet.url, "helloworld")
    detail = str(caught.value).split(": ", 2)[2]
    assert detail.startswith("Something went wrong xxx") and detail.endswith("…")
    assert len(detail) == st3._MAX_DETAIL_CHARS
    assert "\x1b" not in detail and "[31m" not in detail


def test_connection_refused_is_unreachable():
    with socket.socket() as probe:  # a loopback port with no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(st3.UnreachableError, match=f"127.0.0.1:{port}.*refused"):
        st3.deploy(f"http://127.0.0.1:{port}", "helloworld", timeout=5)


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    """A certificate for 127.0.0.1 that no CA store trusts: (cert, key)."""
    require_programs("openssl")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


def test_https_with_an_untrusted_certificate_is_refused(self_signed):
    with (
        Cloudlet(tls=self_signed) as cloudlet,
        pytest.raises(st3.UnreachableError) as caught,
    ):
        st3.deploy(cloudlet.url, "helloworld", timeout=10)
    assert str(caught.value).startswith(f"TLS with {cloudlet.url[8:]} failed: ")
    assert "certificate" in str(caught.value)


def test_https_trusts_the_system_ca_store(self_signed, monkeypatch):
    # OpenSSL's default verify paths (what urllib uses) honour SSL_CERT_FILE:
    # this makes the test certificate part of "the system's CA store".
    monkeypatch.setenv("SSL_CERT_FILE", self_signed[0])
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with Cloudlet(tls=self_signed) as cloudlet:
        (deployment,) = st3.deploy(cloudlet.url, "helloworld", timeout=10)
    assert deployment.uuid == HELLOWORLD


def test_tls_to_a_plain_http_server_fails_cleanly(cloudlet):
    with pytest.raises(st3.UnreachableError, match="TLS with 127.0.0.1:.* failed"):
        st3.deploy(cloudlet.url.replace("http:", "https:"), "helloworld", timeout=5)


@pytest.mark.parametrize(
    "url", ["ftp://example.org", "tier1.example.org", "http://", "http://h/?q=1"]
)
def test_bad_tier1_url_is_a_usage_error(url):
    with pytest.raises(st3.UsageError, match="Tier 1 URL"):
        st3.deploy(url, "helloworld")


@pytest.mark.parametrize("application", ["", "hello", "0000-0000", "../../etc/passwd"])
def test_bad_application_is_a_usage_error(application):
    with pytest.raises(st3.UsageError, match="not a uuid"):
        st3.deploy("http://127.0.0.1:9", application)


@pytest.mark.parametrize("results", [0, -1, True, "2"])
def test_bad_results_is_a_usage_error(cloudlet, results):
    with pytest.raises(st3.UsageError, match="results"):
        st3.deploy(cloudlet.url, "helloworld", results=results)


# Field validation ---------------------------------------------------------

KEY = bytes(range(32))
GOOD = {
    "UUID": HELLOWORLD,
    "ApplicationKey": base64.b64encode(KEY).decode(),
    "Status": "Deployed",
    "DeploymentName": "helloworld-1",
    "Created": "2026-11-25T06:00:00Z",
    "TunnelConfig": {
        "publicKey": base64.b64encode(bytes(32)).decode(),
        "allowedIPs": ["0.0.0.0/0", "::/0"],
        "endpoint": "cloudlet.example.org:51820",
        "address": ["10.0.0.2", "fd00::2/128"],
        "dns": ["10.43.0.10", "fd00::a", "svc.cluster.local", "cluster.local."],
    },
}


def parse(document):
    return st3._parse_deployments(json.dumps(document).encode(), HELLOWORLD, KEY)


def with_field(path, value):
    """GOOD in a list, with the field at dotted `path` set (or deleted if
    value is DELETE)."""
    document = copy.deepcopy(GOOD)
    *parents, name = path.split(".")
    target = document
    for parent in parents:
        target = target[parent]
    if value is DELETE:
        del target[name]
    else:
        target[name] = value
    return [document]


DELETE = object()
P = "deployments[0]"
TC = "deployments[0].TunnelConfig"

FIELD_ERRORS = [
    ("UUID", DELETE, f"{P}.UUID: missing"),
    ("UUID", 7, f"{P}.UUID: expected a string, got number"),
    ("UUID", "not-a-uuid", f"{P}.UUID: not a uuid"),
    ("UUID", "11111111-2222-3333-4444-555555555555", f"{P}.UUID: not the requested"),
    ("ApplicationKey", DELETE, f"{P}.ApplicationKey: missing"),
    ("ApplicationKey", "short", f"{P}.ApplicationKey: not a 32-byte base64 key"),
    (
        "ApplicationKey",
        base64.b64encode(bytes(32)).decode(),
        "not this client's public key",
    ),
    ("Status", DELETE, f"{P}.Status: missing"),
    ("Status", None, f"{P}.Status: expected a string, got null"),
    ("DeploymentName", ["x"], f"{P}.DeploymentName: expected a string, got list"),
    ("Created", 1700000000, f"{P}.Created: expected a string, got number"),
    ("TunnelConfig", DELETE, f"{P}.TunnelConfig: missing"),
    ("TunnelConfig", "wg0", f"{P}.TunnelConfig: expected an object, got string"),
    ("TunnelConfig.publicKey", DELETE, f"{TC}.publicKey: missing"),
    ("TunnelConfig.publicKey", "A" * 42, f"{TC}.publicKey: not a 32-byte base64 key"),
    ("TunnelConfig.publicKey", "é" * 44, f"{TC}.publicKey: not a 32-byte base64 key"),
    ("TunnelConfig.publicKey", True, f"{TC}.publicKey: expected a string, got boolean"),
    ("TunnelConfig.allowedIPs", DELETE, f"{TC}.allowedIPs: missing"),
    (
        "TunnelConfig.allowedIPs",
        "0.0.0.0/0",
        f"{TC}.allowedIPs: expected a list, got string",
    ),
    ("TunnelConfig.allowedIPs", [], f"{TC}.allowedIPs: empty list"),
    (
        "TunnelConfig.allowedIPs",
        ["0.0.0.0/0", 5],
        f"{TC}.allowedIPs[1]: expected a string",
    ),
    (
        "TunnelConfig.allowedIPs",
        ["10.0.0.0/33"],
        f"{TC}.allowedIPs[0]: not an IP network",
    ),
    ("TunnelConfig.endpoint", DELETE, f"{TC}.endpoint: missing"),
    ("TunnelConfig.endpoint", "host", f"{TC}.endpoint: not host:port"),
    ("TunnelConfig.endpoint", "host:0", f"{TC}.endpoint: not host:port"),
    ("TunnelConfig.endpoint", "host:65536", f"{TC}.endpoint: not host:port"),
    ("TunnelConfig.endpoint", "host:-1", f"{TC}.endpoint: not host:port"),
    ("TunnelConfig.endpoint", "fd00::1:51820", f"{TC}.endpoint: host is not a name"),
    (
        "TunnelConfig.endpoint",
        "[nonsense]:51820",
        f"{TC}.endpoint: not an IPv6 address",
    ),
    ("TunnelConfig.endpoint", "bad host:1", f"{TC}.endpoint: host is not a name"),
    ("TunnelConfig.endpoint", "10.0.0.256:1", f"{TC}.endpoint: host is not a name"),
    ("TunnelConfig.endpoint", "host:²", f"{TC}.endpoint: not host:port"),
    ("TunnelConfig.endpoint", ":51820", f"{TC}.endpoint: host is not a name"),
    ("TunnelConfig.address", DELETE, f"{TC}.address: missing"),
    ("TunnelConfig.address", [], f"{TC}.address: empty list"),
    ("TunnelConfig.address", {"a": 1}, f"{TC}.address: expected a list, got object"),
    ("TunnelConfig.address", ["10.0.0.300"], f"{TC}.address[0]: not an IP address"),
    # ipaddress takes an IPv6 zone id with anything after the %, a new line too
    (
        "TunnelConfig.address",
        ["fe80::2%eth0\nPostUp = touch /tmp/owned"],
        f"{TC}.address[0]: not an IP address",
    ),
    ("TunnelConfig.address", [" 10.0.0.2"], f"{TC}.address[0]: not an IP address"),
    ("TunnelConfig.address", ["10.0.0.2/24\n"], f"{TC}.address[0]: not an IP address"),
    ("TunnelConfig.allowedIPs", ["fd00::%x/64"], f"{TC}.allowedIPs[0]: not an IP network"),
    ("TunnelConfig.allowedIPs", ["10.0.0.0/+8"], f"{TC}.allowedIPs[0]: not an IP network"),
    ("TunnelConfig.dns", ["fd00::a%\nsearch evil"], f"{TC}.dns[0]: neither"),
    ("TunnelConfig.endpoint", "[fe80::1%eth0]:51820", f"{TC}.endpoint: not an IPv6"),
    ("TunnelConfig.dns", DELETE, f"{TC}.dns: missing"),
    ("TunnelConfig.dns", [1.5], f"{TC}.dns[0]: expected a string, got number"),
    ("TunnelConfig.dns", ["a b"], f"{TC}.dns[0]: neither an IP address nor a domain"),
    ("TunnelConfig.dns", ["x" * 64 + ".local"], f"{TC}.dns[0]: neither"),
]


@pytest.mark.parametrize("path, value, message", FIELD_ERRORS)
def test_each_field_is_validated(path, value, message):
    with pytest.raises(st3.BadResponseError) as caught:
        parse(with_field(path, value))
    assert message in str(caught.value)
    assert str(caught.value).startswith("bad response from Tier 1: deployments[0].")


def test_valid_document_parses_to_typed_fields():
    (deployment,) = parse([GOOD])
    config = deployment.tunnel_config
    assert deployment.created == "2026-11-25T06:00:00Z"
    assert config.public_key == bytes(32)
    assert [str(n) for n in config.allowed_ips] == ["0.0.0.0/0", "::/0"]
    assert config.endpoint == (
        "cloudlet.example.org",
        51820,
    )
    assert [str(a) for a in config.addresses] == ["10.0.0.2/32", "fd00::2/128"]
    assert [str(a) for a in config.nameservers] == ["10.43.0.10", "fd00::a"]
    assert config.search_domains == ("svc.cluster.local", "cluster.local.")


@pytest.mark.parametrize(
    "endpoint, host, port",
    [("[fd00::1]:51820", "fd00::1", 51820), ("192.0.2.1:1", "192.0.2.1", 1)],
)
def test_endpoint_forms(endpoint, host, port):
    (deployment,) = parse(with_field("TunnelConfig.endpoint", endpoint))
    config = deployment.tunnel_config
    assert config.endpoint == (host, port)
    assert str(config.endpoint) == endpoint


def test_optional_fields_may_be_absent_and_unknown_ones_are_ignored():
    document = with_field("DeploymentName", DELETE)[0]
    del document["Created"]
    document["Extra"] = {"anything": [1, 2]}
    (deployment,) = parse([document])
    assert deployment.deployment_name == "" and deployment.created is None


def test_later_deployments_are_validated_too():
    with pytest.raises(
        st3.BadResponseError, match=r"deployments\[1\]: expected an object"
    ):
        parse([GOOD, "second"])


def test_field_error_through_the_cloudlet(cloudlet):
    def break_key(deployments):
        deployments[0]["TunnelConfig"]["publicKey"] = "bm90IGEga2V5"
        return deployments

    cloudlet.rewrite = break_key
    with pytest.raises(st3.BadResponseError) as caught:
        st3.deploy(cloudlet.url, "helloworld")
    assert str(caught.value) == (
        "bad response from Tier 1: "
        "deployments[0].TunnelConfig.publicKey: not a 32-byte base64 key"
    )


def test_deeply_nested_json_is_a_bad_response():
    with pytest.raises(st3.BadResponseError, match="nested too deeply|not JSON"):
        st3._parse_deployments(b"[" * 100000 + b"]" * 100000, HELLOWORLD, KEY)


SILENT_DNS = """
import socket, time
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink.bind(("127.0.0.1", 53))
end = time.monotonic() + 30
while time.monotonic() < end:  # take queries, answer none
    sink.settimeout(max(end - time.monotonic(), 0.01))
    try:
        sink.recv(512)
    except OSError:
        pass
"""


def test_deadline_covers_a_name_lookup_that_hangs(tmp_path):
    """In a private network and mount namespace whose resolv.conf points at a
    loopback DNS server that never answers, the lookup outlasts the deadline."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private network and mount namespace")
    require_programs("unshare", "mount", "ip")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:10\n")
    (tmp_path / "sink.py").write_text(SILENT_DNS)
    script = (
        f"mount --bind {tmp_path / 'resolv.conf'} /etc/resolv.conf && ip link set lo up "
        f"|| exit 99; {sys.executable} {tmp_path / 'sink.py'} >/dev/null 2>&1 & sink=$!; "
        f"sleep 0.3; {sys.executable} {REPO / 'sinfonia_tier3.py'} --json --timeout 2 "
        "http://tier1.sinfonia-test.example helloworld; status=$?; kill $sink; exit $status"
    )
    started = time.monotonic()
    result = subprocess.run(
        ["unshare", "--net", "--mount", "--fork", "--kill-child", "sh", "-c", script],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 125, result.stderr
    assert json.loads(result.stdout)["error"]["kind"] == "timeout"
    assert "within 2 s" in result.stderr
    assert elapsed < 2 + 4  # not the resolver's own 10 s timeout
