"""Forwards: throughput through -L, and connection set-up through -L and -D,
each next to the same thing done inside the namespace.

    python3 tests/benchmarks/bench_forward.py [--size MiB] [--rounds N] [--connections N]

Against the test cloudlet (tests/cloudlet.py) with our own WireGuard
responder; a bulk HTTP server (bench_tunnel's, GET /N answers N bytes) runs
in the cloudlet's namespace on the backend's address, port 8080. Measured
round-robin, so that machine noise hits both alike:

  inside  `sinfonia-tier3 URL helloworld -- sh -c 'curl ...'`: the download
          and --connections requests of http://helloworld/, from inside
  -L      curl here to `-L 0:BACKEND:8080` (download) and `-L 0:helloworld:80`
  -D      curl --socks5-hostname here to `-D 0`, http://helloworld/

Throughput is curl's size_download / time_total; set-up time is curl's
time_starttransfer for the small page (connect, through the relay and the
tunnel, the request and the first byte back; for -D also the SOCKS5
exchange and the name lookup inside). Target from the issue: -L at least
0.8x the download inside. Needs root and curl; all traffic stays on loopback
and in the namespaces made here.
"""

import argparse
import http.server
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import checkout
import cloudlet
import sessions
from bench_tunnel import _BytesHandler
from netns import missing_requirements, require_programs

TOOL = str(checkout.REPO / "sinfonia_tier3.py")
BULK_PORT = 8080
TARGET_RATIO = 0.8
CURL = ["curl", "-sS", "--max-time", "120"]
DOWNLOAD = ["-o", "/dev/null", "-w", "%{size_download} %{time_total}\\n"]
FIRST_BYTE = ["-o", "/dev/null", "-w", "%{time_starttransfer}\\n"]


def _serve_bulk(wireguard):
    """The bulk HTTP server, on a socket of the cloudlet's namespace."""
    sock = wireguard.namespace.tcp_socket()
    sock.bind((str(cloudlet.HELLOWORLD_ADDRESS), BULK_PORT))
    sock.listen(16)
    server = http.server.ThreadingHTTPServer(sock.getsockname(), _BytesHandler,
                                             bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _throughput(line, size):
    received, seconds = line.split()
    if int(received) != size:
        raise RuntimeError(f"the download got {received} of {size} bytes")
    return size / float(seconds) / 2**20


def _inside(url, cache, size, connections):
    """(MiB/s of the download, set-up seconds of each request) from inside."""
    bulk = f"http://{cloudlet.HELLOWORLD_ADDRESS}:{BULK_PORT}/{size}"
    small = shlex.join([*CURL, *FIRST_BYTE, "http://helloworld/"])
    script = f"{shlex.join([*CURL, *DOWNLOAD, bulk])}; for i in $(seq {connections}); do {small}; done"
    result = subprocess.run([sys.executable, TOOL, url, "helloworld", "--", "sh", "-c", script],
                            env=dict(os.environ, XDG_CACHE_HOME=cache), capture_output=True,
                            text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"inside: {result.stderr.strip()}")
    lines = result.stdout.split("\n")
    return _throughput(lines[0], size), [float(t) for t in lines[1:connections + 1]]


def _through_forwards(local, bulk, proxy, size, connections):
    """The same through -L (throughput, set-up) and -D (set-up)."""
    def curl(*args):
        return subprocess.run([*CURL, *args], capture_output=True, text=True, timeout=600,
                              check=True).stdout

    speed = _throughput(curl(*DOWNLOAD, f"http://{bulk}/{size}"), size)
    via_l = [float(curl(*FIRST_BYTE, f"http://{local}/")) for _ in range(connections)]
    via_d = [float(curl(*FIRST_BYTE, "--socks5-hostname", proxy, "http://helloworld/"))
             for _ in range(connections)]
    return speed, via_l, via_d


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=100, help="download in MiB (100)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds (3)")
    parser.add_argument("--connections", type=int, default=20,
                        help="small requests per round and way (20)")
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"bench_forward: cannot run here: {missing}")
        return 1
    require_programs("curl")
    size = args.size << 20
    speeds = {"inside": [], "-L": []}
    setup = {"inside": [], "-L": [], "-D": []}
    with cloudlet.WireGuardServer("sinfonia") as wireguard, \
            cloudlet.Cloudlet(wireguard=wireguard) as api, \
            tempfile.TemporaryDirectory() as scratch:
        # A key (so a tunnel) each: one client key is one peer at the cloudlet.
        cache, inside_cache = os.path.join(scratch, "forwards"), os.path.join(scratch, "inside")
        bulk_server = _serve_bulk(wireguard)
        forwards = subprocess.Popen(
            [sys.executable, TOOL, "-L", "0:helloworld:80", "-L",
             f"0:{cloudlet.HELLOWORLD_ADDRESS}:{BULK_PORT}", "-D", "0", api.url,
             "helloworld"], env=dict(os.environ, XDG_CACHE_HOME=cache),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            (local, bulk, proxy), _ = sessions.forwarding_addresses(forwards, 3)
            for round_number in range(args.rounds):
                speed, times = _inside(api.url, inside_cache, size, args.connections)
                speeds["inside"].append(speed)
                setup["inside"] += times
                speed, via_l, via_d = _through_forwards(local, bulk, proxy, size,
                                                        args.connections)
                speeds["-L"].append(speed)
                setup["-L"] += via_l
                setup["-D"] += via_d
                print(f"round {round_number + 1}: inside {speeds['inside'][-1]:.0f} MiB/s, "
                      f"-L {speed:.0f} MiB/s", file=sys.stderr, flush=True)
        finally:
            forwards.send_signal(signal.SIGTERM)
            try:
                forwards.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                forwards.kill()
                forwards.wait()
            bulk_server.server_close()
    _report(args, speeds, setup)
    return 0


def _report(args, speeds, setup):
    print(f"\nForwards, {args.rounds} rounds round-robin, download of {args.size} MiB, "
          f"{args.connections} small requests per round and way\n")
    header = f"{'way':10} {'download MiB/s (median)':>24} {'first byte ms: median':>22} {'p90':>7}"
    print(header)
    print("-" * len(header))
    for way in ("inside", "-L", "-D"):
        speed = f"{statistics.median(speeds[way]):.1f}" if way in speeds else "-"
        times = sorted(setup[way])
        p90 = times[int(0.9 * (len(times) - 1))]
        print(f"{way:10} {speed:>24} {statistics.median(times) * 1000:22.2f} {p90 * 1000:7.2f}")
    ratio = statistics.median(speeds["-L"]) / statistics.median(speeds["inside"])
    print(f"\n-L/inside download: {ratio:.2f}  target >= {TARGET_RATIO}x  "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}")
    for way in ("-L", "-D"):
        extra = statistics.median(setup[way]) - statistics.median(setup["inside"])
        print(f"set-up through {way}: {extra * 1000:+.2f} ms against inside (median)")


if __name__ == "__main__":
    sys.exit(main())
