"""Property tests of what comes from outside: whatever JSON a server sends,
the validator returns deployments or raises the tool's own BadResponseError,
and what it accepts renders to exactly its fields; whatever the root helper
is fed, it answers with one line."""

import base64
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

import sinfonia_tier3 as st3

HELLOWORLD = "00000000-0000-0000-0000-000000000000"
KEY = bytes(range(32))
KEY_TEXT = base64.b64encode(KEY).decode()

json_values = s.recursive(
    s.none() | s.booleans() | s.integers() | s.floats(allow_nan=False) | s.text(),
    lambda children: (
        s.lists(children, max_size=4)
        | s.dictionaries(s.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)

# Mostly well-formed documents with arbitrary values in any place, so that
# the deeper fields are reached too, not only the top-level type check.
field_values = s.one_of(
    json_values,
    s.sampled_from([KEY_TEXT, HELLOWORLD, "1.2.3.4:5", "[::1]:٥", "h:²"]),
    s.lists(
        s.sampled_from(["10.0.0.1", "::/0", "a.b", "x y", "[::1]:1", ""]), max_size=3
    ),
)
tunnel_configs = s.fixed_dictionaries(
    {},
    optional={
        name: field_values
        for name in ("publicKey", "allowedIPs", "endpoint", "address", "dns")
    },
)
deployments = s.fixed_dictionaries(
    {},
    optional={
        "UUID": field_values,
        "ApplicationKey": field_values,
        "Status": field_values,
        "DeploymentName": field_values,
        "Created": field_values,
        "TunnelConfig": tunnel_configs | json_values,
    },
)
documents = json_values | s.lists(deployments, max_size=3)


def check(document_bytes):
    try:
        result = st3._parse_deployments(document_bytes, HELLOWORLD, KEY)
    except st3.BadResponseError as e:
        line = str(e)
        assert "\n" not in line and line.startswith("bad response from Tier 1: ")
    else:
        assert result and all(isinstance(d, st3.Deployment) for d in result)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_arbitrary_json_gives_deployments_or_a_bad_response(document):
    check(json.dumps(document).encode())


@settings(max_examples=200, deadline=None)
@given(s.binary(max_size=200))
def test_arbitrary_bytes_give_deployments_or_a_bad_response(body):
    check(body)


def test_a_number_too_long_for_int_is_a_bad_response():
    """json turns a 5000-digit number into a ValueError that is no
    JSONDecodeError (Python's limit on int() conversions)."""
    with pytest.raises(st3.BadResponseError, match="a number too long"):
        st3._parse_deployments(b"[" + b"7" * 5000 + b"]", HELLOWORLD, KEY)


# What a server sends never changes what the tool writes ---------------------

# Text that tries to end a line or a value, hide in an IPv6 zone id (which
# ipaddress accepts with anything after the %), or reach the terminal.
HOSTILE = [
    "fe80::1%eth0\nPostUp = touch /tmp/owned",
    "fd00::1%x", "::1%a b", "10.0.0.1\n", " 10.0.0.1", "10.0.0.0/8\r\nDNS = 1.1.1.1",
    "10.0.0.1, 10.0.0.2", "a.b\nnameserver 6.6.6.6", "svc.local options",
    "x\x1b[2Jy", "10.0.0.0/255.0.0.0", "[fe80::1%\n]:51820", "h:1\nEndpoint=x:2",
    "cloudlet.example:51820 # c", "\u2028", "١٢٣.1.1.1",
]
addresses = s.ip_addresses().map(str)
networks = s.builds(
    lambda address, bits: f"{address}/{bits % (33 if address.version == 4 else 129)}",
    s.ip_addresses(), s.integers(0, 128))
domains = s.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z0-9_]{1,8}){0,3}\.?",
                       fullmatch=True)
endpoints = s.one_of(
    s.builds(lambda a, p: f"{a}:{p}", s.ip_addresses(v=4), s.integers(1, 65535)),
    s.builds(lambda a, p: f"[{a}]:{p}", s.ip_addresses(v=6), s.integers(1, 65535)),
    s.builds(lambda d, p: f"{d}:{p}", domains, s.integers(1, 65535)),
)


def maybe_hostile(values):
    return s.one_of(values, s.sampled_from(HOSTILE), s.text(max_size=20))


def string_lists(values):
    return s.lists(maybe_hostile(values), min_size=1, max_size=4)


rendered_documents = s.fixed_dictionaries({
    "UUID": s.just(HELLOWORLD),
    "ApplicationKey": s.just(KEY_TEXT),
    "Status": maybe_hostile(s.just("Deployed")),
    "DeploymentName": maybe_hostile(domains),
    "TunnelConfig": s.fixed_dictionaries({
        "publicKey": s.just(base64.b64encode(bytes(range(1, 33))).decode()),
        "allowedIPs": string_lists(networks),
        "endpoint": maybe_hostile(endpoints),
        "address": string_lists(s.one_of(addresses, networks)),
        "dns": s.lists(maybe_hostile(s.one_of(addresses, domains)), max_size=5),
    }),
})


def key_values(text):
    """wg-quick text back as (section, key, value) triples, every line
    checked to be one plain-ASCII `[Section]` or `Key = Value`."""
    section, triples = None, []
    for line in text.split("\n")[:-1]:
        assert all(" " <= c <= "~" for c in line), repr(line)
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line:
            key, sep, value = line.partition(" = ")
            assert sep and key.isalpha() and "=" not in key, repr(line)
            triples.append((section, key, value))
    assert text.endswith("\n")
    return triples


def is_ip(text):
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def expected_networks(texts, parse):
    return ", ".join(str(parse(text)) for text in texts)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rendered_documents)
def test_accepted_deployments_render_exactly_their_fields(document):
    """For any deployment the validator accepts, wg.conf, resolv.conf and the
    QR code's text parse back line by line to exactly the keys and values
    that went in; anything else is refused with the tool's one line."""
    import ipaddress

    try:
        (deployment,) = st3._parse_deployments(json.dumps([document]).encode(),
                                              HELLOWORLD, KEY)
    except st3.BadResponseError as e:
        assert "\n" not in str(e)
        return
    config, tunnel = deployment.tunnel_config, document["TunnelConfig"]
    for text in (deployment.status, deployment.deployment_name):
        assert text.isprintable()
    keypair = st3._KeyPair(bytes(range(32)), KEY)
    nameservers = [str(ipaddress.ip_address(t)) for t in tunnel["dns"] if is_ip(t)]
    searches = [t for t in tunnel["dns"] if not is_ip(t)]
    dns = nameservers + searches
    host, _, port = tunnel["endpoint"].rpartition(":")
    interface = [
        ("Interface", "PrivateKey", base64.b64encode(keypair.private).decode()),
        ("Interface", "Address", expected_networks(tunnel["address"],
                                                   ipaddress.ip_interface)),
    ] + ([("Interface", "DNS", ", ".join(dns))] if dns else [])
    peer = [
        ("Peer", "PublicKey", tunnel["publicKey"]),
        ("Peer", "Endpoint", f"{host}:{int(port)}"),
        ("Peer", "PersistentKeepalive", str(st3._PERSISTENT_KEEPALIVE)),
        ("Peer", "AllowedIPs", expected_networks(
            tunnel["allowedIPs"], lambda t: ipaddress.ip_network(t, strict=False))),
    ]
    assert key_values(st3._render_wg_quick(config, keypair)) == interface + peer
    assert key_values(st3._render_wg_quick(config, keypair, ["org.example.app"])) == (
        interface + [("Interface", "IncludedApplications", "org.example.app")] + peer)

    resolv = st3._render_resolv_conf(config).split("\n")
    assert resolv.pop() == ""
    expected = [f"nameserver {n}" for n in nameservers]
    expected += [f"search {' '.join(searches)}"] if searches else []
    assert resolv == expected + [f"options ndots:{st3._RESOLV_NDOTS}"]
    assert all(" " <= c <= "~" for line in resolv for c in line)


# The root helper's request, as anyone who may run it can write it -----------

REQUEST_FIELDS = ("private_key", "peer_public_key", "endpoint", "listen_port",
                  "allowed_ips", "persistent_keepalive")
big_numbers = s.one_of(s.integers(), s.integers(min_value=10**30, max_value=10**300),
                       s.floats(allow_nan=True, allow_infinity=True))
request_values = s.recursive(
    s.none() | s.booleans() | big_numbers | s.text(max_size=50)
    | s.sampled_from([KEY_TEXT, "192.0.2.1", "10.0.0.0/8", "fe80::1%x/64", 0, 51820]),
    lambda children: s.lists(children, max_size=4)
    | s.dictionaries(s.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
requests = s.fixed_dictionaries({}, optional=dict.fromkeys(REQUEST_FIELDS, request_values))
raw_requests = s.one_of(
    requests.map(lambda r: json.dumps(r).encode()),
    s.binary(max_size=300),
    s.integers(1, 20000).map(lambda depth: b"[" * depth + b"]" * depth),
    s.integers(4000, 8000).map(lambda digits: b'{"listen_port": ' + b"9" * digits + b"}"),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_requests)
def test_root_helper_request_parser_refuses_in_one_line(data):
    try:
        spec = st3._parse_kernel_link_request(data)
    except st3.TunnelError as e:
        assert "\n" not in str(e)
        assert str(e).startswith("invalid kernel WireGuard configuration: ")
    else:
        assert spec.listen_port == 0 and len(spec.private_key) == 32


@pytest.mark.skipif(os.geteuid() != 0, reason="the root helper refuses anyone but root")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_requests, s.lists(s.text(max_size=12), max_size=3))
def test_root_helper_answers_anything_with_one_line(data, args):
    """In process, as root: whatever the arguments and the request, one line
    on stderr and a failure status (pid 2 is never the caller's)."""
    import contextlib
    import io

    stderr = io.StringIO()
    saved = os.environ.get("SUDO_UID")
    os.environ["SUDO_UID"] = "4242"
    try:
        with contextlib.redirect_stderr(stderr):
            status = st3._root_helper_main(["2", "wgok"] if not args else args,
                                          io.BytesIO(data))
    finally:
        if saved is None:
            del os.environ["SUDO_UID"]
        else:
            os.environ["SUDO_UID"] = saved
    assert status != 0
    assert stderr.getvalue().count("\n") == 1 and "Traceback" not in stderr.getvalue()
