"""A test cloudlet: the deploy API of a Sinfonia Tier 1 / Tier 2 on loopback.

It answers `POST /api/v1/deploy/{uuid}/{key}` as DESIGN §2 describes (the
same key and uuid get the same deployment; an unknown uuid gets a 404
problem+json; a malformed key or uuid a 400), and `GET` / `DELETE` on the same
path as a Tier 2 does. Setting `misbehaviour` to one of MISBEHAVIOURS turns it
into one kind of hostile server; `rewrite` edits the deployments it sends, for
tests of single fields.

The WireGuard side is pluggable: the cloudlet asks `wireguard.tunnel_config_for
(uuid, client_public_key)` for each new deployment's TunnelConfig. The default,
StaticWireGuard, returns a valid configuration whose endpoint is a loopback
port nobody listens on; a real WireGuard server object with the same method
replaces it where a tunnel must come up.

    python3 tests/cloudlet.py serve [--port N] [--misbehave NAME]
"""

import argparse
import base64
import binascii
import datetime
import hashlib
import http.server
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
import uuid as uuidlib

HELLOWORLD = "00000000-0000-0000-0000-000000000000"
SLOW_LIMIT = 120.0  # seconds: the longest any deliberately slow answer lasts


def public_key_of(private_key):
    """X25519 public key (pynacl, as the client uses)."""
    from nacl.bindings import crypto_scalarmult_base

    return crypto_scalarmult_base(private_key)


def unused_udp_port(host="127.0.0.1"):
    """A UDP port that nothing was bound to a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class StaticWireGuard:
    """Hands out syntactically valid tunnel configurations; no WireGuard
    server answers behind them."""

    def __init__(self, endpoint=None):
        self.private_key = os.urandom(32)
        self.public_key = public_key_of(self.private_key)
        self.endpoint = endpoint or f"127.0.0.1:{unused_udp_port()}"
        self._next_host = 2
        self._lock = threading.Lock()

    def tunnel_config_for(self, uuid, client_public_key):
        with self._lock:
            host = self._next_host
            self._next_host += 1
        return {
            "publicKey": base64.b64encode(self.public_key).decode(),
            "allowedIPs": ["10.0.0.0/16", "10.43.0.0/16"],
            "endpoint": self.endpoint,
            "address": [f"10.0.{host // 256}.{host % 256}/32"],
            "dns": [
                "10.43.0.10",
                f"app-{uuid[:8]}.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
            ],
        }


def parse_key(text):
    """32 key bytes from standard or URL-safe base64 with or without padding,
    as the upstream servers accept it; None if malformed."""
    text = text.replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == 32 else None


def problem(status, title, detail):
    """An application/problem+json answer."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return status, "application/problem+json", json.dumps(body).encode()


# Each misbehaviour is a way a real server, proxy or network can answer.
MISBEHAVIOURS = {
    "close": "close the connection without answering",
    "garbage": "answer with bytes that are not HTTP",
    "redirect": "302 to another URL",
    "html": "200 with an HTML page",
    "text": "200 with plain text",
    "html-error": "502 with a proxy's HTML error page",
    "text-error": "503 with a plain text error",
    "problem": "500 problem+json with a long detail full of control characters",
    "truncated": "200 with JSON cut off half way",
    "short-body": "200 announcing more bytes than it sends, then closing",
    "wrong-type": "200 with a JSON object instead of a list",
    "empty-list": "200 with an empty list",
    "empty-body": "200 with no body at all",
    "not-utf8": "200 application/json whose bytes are not UTF-8",
    "huge": "200 with a 2 MiB body and an honest Content-Length",
    "huge-unannounced": "200 streaming 2 MiB without a Content-Length",
    "endless": "200 dripping a byte every 50 ms, never ending",
    "slow-headers": "accept the connection and say nothing",
}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that hangs up on a hostile answer is expected, not news."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Cloudlet:
    """The deploy API on a loopback port, in a background thread."""

    def __init__(
        self, wireguard=None, backends=(HELLOWORLD,), host="127.0.0.1", port=0
    ):
        self.wireguard = wireguard or StaticWireGuard()
        self.backends = set(backends)
        self.misbehaviour = None  # a key of MISBEHAVIOURS, or None to behave
        self.rewrite = None  # callable(list of deployment dicts) -> JSON value
        self.requests = []  # (method, path, headers) of every request
        self._deployments = {}  # (uuid, key bytes) -> deployment dict
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server((host, port), self._handler_class())
        self._thread = None

    @property
    def url(self):
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cloudlet", daemon=True
        )
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # The API ------------------------------------------------------------

    def answer(self, method, path, query):
        """(status, content type, body bytes) for a well-behaved server."""
        parts = path.strip("/").split("/")
        if parts[:3] != ["api", "v1", "deploy"] or len(parts) != 5:
            return problem(404, "Not Found", f"no such path: {path}")
        try:
            uuid = str(uuidlib.UUID(parts[3]))
        except ValueError:
            return problem(400, "Bad Request", f"{parts[3]!r} is not a uuid")
        key = parse_key(parts[4])
        if key is None:
            return problem(400, "Bad Request", f"{parts[4]!r} is not a WireGuard key")
        results = query.get("results", ["1"])[-1]
        if not results.isdigit() or int(results) < 1:
            return problem(400, "Bad Request", f"results={results!r} is not >= 1")
        if uuid not in self.backends:
            return problem(404, "Not Found", f"no backend {uuid} on this cloudlet")
        with self._lock:
            existing = self._deployments.get((uuid, key))
            if method == "DELETE":
                self._deployments.pop((uuid, key), None)
                return 204, "", b""
            if method == "GET" and existing is None:
                return problem(404, "Not Found", "no such deployment")
            if existing is None:
                existing = self._deployments[(uuid, key)] = self._new_deployment(
                    uuid, key
                )
        deployments = [existing]
        if self.rewrite is not None:
            deployments = self.rewrite(json.loads(json.dumps(deployments)))
        return 200, "application/json", json.dumps(deployments).encode()

    def _new_deployment(self, uuid, key):
        name = "helloworld" if uuid == HELLOWORLD else f"app-{uuid[:8]}"
        return {
            "UUID": uuid,
            "ApplicationKey": base64.b64encode(key).decode(),
            "Status": "Deployed",
            "DeploymentName": f"{name}-{hashlib.sha256(key).hexdigest()[:8]}",
            "Created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "TunnelConfig": self.wireguard.tunnel_config_for(uuid, key),
        }

    # HTTP ---------------------------------------------------------------

    def _handler_class(self):
        cloudlet = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "sinfonia-test-cloudlet/1"

            def log_message(self, format, *args):
                pass

            def do_POST(self):
                self.handle_api("POST")

            def do_GET(self):
                self.handle_api("GET")

            def do_DELETE(self):
                self.handle_api("DELETE")

            def handle_api(self, method):
                url = urllib.parse.urlsplit(self.path)
                cloudlet.requests.append((method, self.path, dict(self.headers)))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(min(length, 65536))
                status, content_type, body = cloudlet.answer(
                    method, url.path, urllib.parse.parse_qs(url.query)
                )
                if cloudlet.misbehaviour and method == "POST":
                    cloudlet._misbehave(self, cloudlet.misbehaviour, body)
                else:
                    self.send(status, content_type, body)

            def send(self, status, content_type, body, length=None):
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header(
                    "Content-Length", str(len(body) if length is None else length)
                )
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def _misbehave(self, handler, name, good_body):
        """Answer through `handler` the way misbehaviour `name` says."""
        send = handler.send
        if name == "close":
            handler.close_connection = True
        elif name == "garbage":
            handler.wfile.write(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff\xfe")
        elif name == "redirect":
            handler.send_response(302)
            handler.send_header("Location", "https://elsewhere.invalid/api/v1/deploy")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        elif name == "html":
            send(
                200,
                "text/html",
                b"<html><body><h1>Welcome to nginx!</h1></body></html>",
            )
        elif name == "text":
            send(200, "text/plain", b"deployment queued, try again later\n")
        elif name == "html-error":
            page = b"<html><head><title>502 Bad Gateway</title></head><body>oops</body></html>"
            send(502, "text/html", page)
        elif name == "text-error":
            send(503, "text/plain", b"upstream connect error\nline two\n")
        elif name == "problem":
            detail = "Something \x1b[31mwent\x1b[0m wrong\r\n\x07" + "x" * 5000
            send(*problem(500, "Internal Server Error", detail))
        elif name == "truncated":
            send(200, "application/json", good_body[: len(good_body) // 2])
        elif name == "short-body":
            send(200, "application/json", good_body[:100], length=len(good_body))
        elif name == "wrong-type":
            send(200, "application/json", json.dumps({"deployments": []}).encode())
        elif name == "empty-list":
            send(200, "application/json", b"[]")
        elif name == "empty-body":
            send(200, "application/json", b"")
        elif name == "not-utf8":
            send(200, "application/json", b'["\xff\xfe\xfa"]')
        elif name == "huge":
            send(200, "application/json", b"[" + b" " * (2 << 20) + b"]")
        elif name == "huge-unannounced":
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.end_headers()
            handler.close_connection = True
            handler.wfile.write(b"[")
            for _ in range(32):
                handler.wfile.write(b" " * 65536)
        elif name == "endless":
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.end_headers()
            handler.close_connection = True
            handler.wfile.write(b"[")
            deadline = time.monotonic() + SLOW_LIMIT
            while time.monotonic() < deadline and not self._stopping.wait(0.05):
                handler.wfile.write(b" ")
                handler.wfile.flush()
        elif name == "slow-headers":
            self._stopping.wait(SLOW_LIMIT)
            handler.close_connection = True
        else:
            raise ValueError(f"unknown misbehaviour {name!r}")


def _serve(argv=None):
    parser = argparse.ArgumentParser(
        prog="cloudlet.py", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="serve the deploy API until interrupted")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--misbehave", choices=sorted(MISBEHAVIOURS))
    options = parser.parse_args(argv)
    cloudlet = Cloudlet(host=options.host, port=options.port)
    cloudlet.misbehaviour = options.misbehave
    with cloudlet:
        print(
            f"test cloudlet at {cloudlet.url} (helloworld = {HELLOWORLD})", flush=True
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    _serve()
