"""Property test: whatever JSON a server sends, the validator either returns
deployments or raises the tool's own BadResponseError, nothing else."""

import base64
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

import sinfonia_tier3 as st

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
        result = st._parse_deployments(document_bytes, HELLOWORLD, KEY)
    except st.BadResponseError as e:
        line = str(e)
        assert "\n" not in line and line.startswith("bad response from Tier 1: ")
    else:
        assert result and all(isinstance(d, st.Deployment) for d in result)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_arbitrary_json_gives_deployments_or_a_bad_response(document):
    check(json.dumps(document).encode())


@settings(max_examples=200, deadline=None)
@given(s.binary(max_size=200))
def test_arbitrary_bytes_give_deployments_or_a_bad_response(body):
    check(body)
