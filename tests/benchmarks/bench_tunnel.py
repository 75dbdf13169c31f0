"""Tunnel throughput: our datapath against wireguard-go and against no tunnel.

    python3 tests/benchmarks/bench_tunnel.py [--size MiB] [--rounds N]

Four set-ups, each a client and a server namespace:
  (a) our datapath <-> wireguard-go    (b) our datapath <-> our datapath
  (c) wireguard-go <-> wireguard-go    (d) no tunnel (a veth pair)
measured round-robin, so machine noise hits all of them alike: an HTTP
download of --size MiB (server -> client) and iperf3 in both directions.
Prints medians, ratios against (c) and (d), CPU seconds per GiB of each
tunnel end and the peak RSS of our datapath process tree.

Where the kernel has WireGuard (the test VM: `python3 tests/vm/run.py --
python3 tests/benchmarks/bench_tunnel.py`), two more: (e) our datapath <->
a kernel WireGuard link and (k) kernel <-> kernel, the kernel backend's
figure next to the userspace one (b) from the same run.

Targets from the issue: (a) at least as fast as (c); (b) at least 2x (c).
Needs root, wireguard-go, wg, iperf3 and curl. All UDP stays on the host's
loopback; all tunnel traffic stays inside the namespaces made here.
"""

import argparse
import http.server
import json
import os
import select
import statistics
import struct
import subprocess
import sys
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import checkout  # noqa: F401 - puts the repository root first on sys.path
from netns import (
    Namespace,
    OurDatapath,
    WireguardGo,
    generate_keypair,
    missing_requirements,
    require_programs,
    unique_name,
    veth_pair,
)

CLIENT, SERVER = "10.99.0.1", "10.99.0.2"
HTTP_PORT = 8080
CASES = {
    "a": "(a) ours <-> wireguard-go",
    "b": "(b) ours <-> ours",
    "c": "(c) wireguard-go <-> wireguard-go",
    "d": "(d) no tunnel (veth)",
    "e": "(e) ours <-> kernel WireGuard",
    "k": "(k) kernel <-> kernel WireGuard",
}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# Process accounting ###########################################################


def _process_tree(root):
    """`root` and all its live descendants."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier.extend(children)
    return tree


def _cpu_seconds(root):
    """User+system CPU of the tree so far, reaped children included."""
    total = 0
    for pid in _process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / _CLK_TCK


def _peak_rss_mib(root):
    """(largest single process, whole tree) peak RSS in MiB."""
    peaks = []
    for pid in _process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return (max(peaks), sum(peaks)) if peaks else (0.0, 0.0)


# Tunnel ends ##################################################################


class _OurEnd:
    """Our datapath in a process of its own, so its CPU and memory are its own.

    The process builds the datapath (TUN in `namespace`), reports its UDP
    port, waits for the handshake when it initiates, and stops when the pipe
    from us closes.
    """

    kind = "ours"

    def __init__(
        self, namespace, address, private_key, peer_public_key, endpoint, vnet_hdr
    ):
        import ipaddress

        ready_r, ready_w = os.pipe()
        stop_r, stop_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            status = 1
            try:
                os.close(ready_r)
                os.close(stop_w)
                with OurDatapath(
                    namespace,
                    [f"{address}/24"],
                    private_key,
                    peer_public_key,
                    endpoint=endpoint,
                    allowed_ips=[ipaddress.ip_network("10.99.0.0/24")],
                    vnet_hdr=vnet_hdr,
                ) as ours:
                    ours.start()
                    if endpoint is not None:
                        ours.datapath.wait_for_handshake(10)
                    os.write(ready_w, struct.pack("H", ours.datapath.listen_port))
                    os.read(stop_r, 1)
                status = 0
            except BaseException:  # noqa: BLE001 - the child reports and exits
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(ready_w)
        os.close(stop_r)
        self._stop_w = stop_w
        try:
            if not select.select([ready_r], [], [], 20)[0]:
                raise RuntimeError("our datapath did not get ready in 20 s")
            data = os.read(ready_r, 2)
            if len(data) != 2:
                raise RuntimeError("our datapath process failed (traceback above)")
            self.listen_port = struct.unpack("H", data)[0]
        except BaseException:
            self.close()
            raise
        finally:
            os.close(ready_r)

    @property
    def endpoint(self):
        return ("127.0.0.1", self.listen_port)

    def close(self):
        if self._stop_w is None:
            return
        os.close(self._stop_w)
        self._stop_w = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                return
            time.sleep(0.05)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)


class _KernelEnd:
    """A kernel WireGuard link, made by the kernel backend's own
    `_create_kernel_link` and moved into `namespace`; its UDP socket stays on
    the host's loopback. Its CPU time is the kernel's, not counted here."""

    kind = "kernel"
    pid = None

    def __init__(self, namespace, address, private_key, peer_public_key, endpoint):
        import sinfonia_tier3 as st3

        name = unique_name("st3bk")
        spec = st3._kernel_link_spec(
            private_key, peer_public_key, endpoint=endpoint,
            allowed_ips=["10.99.0.0/24"])
        netns_fd = os.open(namespace.path, os.O_RDONLY)
        try:
            st3._create_kernel_link(name, spec, netns_fd)
        finally:
            os.close(netns_fd)
        namespace.add_addresses(name, [f"{address}/24"])
        self.listen_port = int(namespace.run(["wg", "show", name, "listen-port"]))

    @property
    def endpoint(self):
        return ("127.0.0.1", self.listen_port)


def _kernel_wireguard_missing():
    """Why this kernel cannot make WireGuard links, or None."""
    name = unique_name("st3bp")
    result = subprocess.run(["ip", "link", "add", name, "type", "wireguard"],
                            capture_output=True, text=True, check=False)
    if result.returncode:
        return result.stderr.strip() or "ip link add type wireguard failed"
    subprocess.run(["ip", "link", "del", name], check=True)
    return None


class _TheirEnd:
    kind = "wireguard-go"

    def __init__(self, wireguard_go):
        self.wg = wireguard_go
        self.pid = wireguard_go.pid


def _build(case, stack, vnet_hdr):
    """Client and server namespaces joined as `case` says; returns
    (client_ns, server_ns, [client end, server end])."""
    client_ns = stack.enter_context(Namespace("st3bc"))
    server_ns = stack.enter_context(Namespace("st3bs"))
    if case == "d":
        veth_pair(client_ns, server_ns, [f"{CLIENT}/24"], [f"{SERVER}/24"])
        return client_ns, server_ns, []
    (client_private, client_public), (server_private, server_public) = (
        generate_keypair(),
        generate_keypair(),
    )
    ends = []
    if case in "ek":
        server_end = _KernelEnd(server_ns, SERVER, server_private, client_public, None)
        if case == "e":
            client_end = _OurEnd(client_ns, CLIENT, client_private, server_public,
                                 server_end.endpoint, vnet_hdr)
            stack.callback(client_end.close)
        else:
            client_end = _KernelEnd(client_ns, CLIENT, client_private, server_public,
                                    server_end.endpoint)
        return client_ns, server_ns, [client_end, server_end]
    if case in "ab":  # the server end first: the client needs its port
        if case == "a":
            server = stack.enter_context(
                WireguardGo(server_ns, [f"{SERVER}/24"], private_key=server_private)
            )
            server.set_peer(client_public, allowed_ips=[f"{CLIENT}/32"])
            server_end = _TheirEnd(server)
        else:
            server_end = _OurEnd(
                server_ns, SERVER, server_private, client_public, None, vnet_hdr
            )
            stack.callback(server_end.close)
        endpoint = server_end.wg.endpoint if case == "a" else server_end.endpoint
        client_end = _OurEnd(
            client_ns, CLIENT, client_private, server_public, endpoint, vnet_hdr
        )
        stack.callback(client_end.close)
        ends = [client_end, server_end]
    else:
        client = stack.enter_context(
            WireguardGo(client_ns, [f"{CLIENT}/24"], private_key=client_private)
        )
        server = stack.enter_context(
            WireguardGo(server_ns, [f"{SERVER}/24"], private_key=server_private)
        )
        client.set_peer(
            server_public, endpoint=server.endpoint, allowed_ips=[f"{SERVER}/32"]
        )
        server.set_peer(client_public, allowed_ips=[f"{CLIENT}/32"])
        ends = [_TheirEnd(client), _TheirEnd(server)]
    return client_ns, server_ns, ends


# Traffic ######################################################################

_CHUNK = memoryview(bytes(range(256)) * 4096)  # 1 MiB


class _BytesHandler(http.server.BaseHTTPRequestHandler):
    """GET /N answers N bytes."""

    def do_GET(self):
        size = int(self.path.strip("/"))
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        while size > 0:
            size -= self.wfile.write(_CHUNK[: min(size, len(_CHUNK))])

    def log_message(self, *args):
        pass


def _serve_http(address, port):
    http.server.ThreadingHTTPServer((address, port), _BytesHandler).serve_forever()


def _http_download(client_ns, size, timeout):
    """MiB/s of one download of `size` bytes from the server namespace."""
    out = client_ns.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--retry",
            "3",
            "--retry-connrefused",
            "--max-time",
            str(timeout),
            "-w",
            "%{size_download} %{time_total}",
            f"http://{SERVER}:{HTTP_PORT}/{size}",
        ],
        timeout=timeout + 10,
    )
    received, seconds = out.split()
    if int(received) != size:
        raise RuntimeError(f"HTTP download got {received} of {size} bytes")
    return size / float(seconds) / 2**20, size


def _iperf3(client_ns, seconds, reverse):
    """(Mbit/s received, bytes moved, TCP retransmissions) of one iperf3 run."""
    argv = ["iperf3", "-c", SERVER, "-t", str(seconds), "-J"] + (
        ["-R"] if reverse else []
    )
    report = json.loads(client_ns.run(argv, timeout=seconds + 30))
    received = report["end"]["sum_received"]
    retransmits = report["end"]["sum_sent"].get("retransmits", 0)
    return received["bits_per_second"] / 1e6, received["bytes"], retransmits


# Measurement ##################################################################


def _measure(case, setup, size, seconds):
    client_ns, _, ends = setup
    ends = [end for end in ends if end.pid is not None]  # kernel ends: no process
    cpu_before = [_cpu_seconds(end.pid) for end in ends]
    http_mibs, http_bytes = _http_download(client_ns, size, timeout=600)
    up_mbits, up_bytes, up_retransmits = _iperf3(client_ns, seconds, reverse=False)
    down_mbits, down_bytes, down_retransmits = _iperf3(client_ns, seconds, reverse=True)
    moved = http_bytes + up_bytes + down_bytes
    cpu = [_cpu_seconds(end.pid) - before for end, before in zip(ends, cpu_before)]
    return {
        "http": http_mibs,
        "up": up_mbits,
        "down": down_mbits,
        "cpu": cpu,
        "bytes": moved,
        "retransmits": (up_retransmits, down_retransmits),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", type=int, default=500, help="HTTP download in MiB (500)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds (3)")
    parser.add_argument("--seconds", type=int, default=5, help="each iperf3 run (5 s)")
    parser.add_argument("--cases", default="abcdek",
                        help="which set-ups (abcdek; e and k only where the "
                             "kernel has WireGuard)")
    parser.add_argument(
        "--plain-tun", action="store_true", help="open our TUN without IFF_VNET_HDR"
    )
    args = parser.parse_args(argv)
    reason = missing_requirements()
    if reason:
        print(f"bench_tunnel: skipped: {reason}", file=sys.stderr)
        return 0
    require_programs("wireguard-go", "wg", "iperf3", "curl")
    cases = [c for c in "abcdek" if c in args.cases]
    kernel_missing = _kernel_wireguard_missing() if {"e", "k"} & set(cases) else None
    if kernel_missing:
        print(f"bench_tunnel: no kernel WireGuard here ({kernel_missing}): "
              "leaving out (e) and (k); run it in the test VM for those",
              file=sys.stderr)
        cases = [c for c in cases if c not in "ek"]
    results = {case: [] for case in cases}
    rss = {}
    with ExitStack() as stack:
        setups = {}
        for case in cases:
            setups[case] = _build(case, stack, vnet_hdr=not args.plain_tun)
            _, server_ns, _ = setups[case]
            server_ns.fork(_serve_http, SERVER, HTTP_PORT)
            server_ns.popen(["iperf3", "-s"], stdout=subprocess.DEVNULL)
        time.sleep(0.5)  # servers listening
        for round_number in range(args.rounds):
            for case in cases:
                result = _measure(case, setups[case], args.size << 20, args.seconds)
                results[case].append(result)
                print(
                    f"round {round_number + 1} {CASES[case]}: HTTP {result['http']:.0f} MiB/s,"
                    f" iperf3 up {result['up']:.0f} / down {result['down']:.0f} Mbit/s"
                    " (TCP retransmissions {} / {})".format(*result["retransmits"]),
                    file=sys.stderr,
                    flush=True,
                )
        for case in cases:
            rss[case] = [
                _peak_rss_mib(end.pid) for end in setups[case][2] if end.kind == "ours"
            ]
    _report(cases, results, rss, args)
    return 0


def _report(cases, results, rss, args):
    version = subprocess.run(
        ["wireguard-go", "--version"], check=False, capture_output=True, text=True
    )
    print(
        f"\nTunnel throughput, medians of {args.rounds} rounds, HTTP download of "
        f"{args.size} MiB, iperf3 {args.seconds} s each way; "
        f"{version.stdout.splitlines()[0] if version.stdout else 'wireguard-go'}; "
        f"our TUN {'plain' if args.plain_tun else 'IFF_VNET_HDR'}\n"
    )
    medians = {}
    header = (
        f"{'set-up':36} {'HTTP MiB/s':>11} {'up Mbit/s':>10} {'down Mbit/s':>12}"
        f"  CPU s/GiB client end, server end"
    )
    print("HTTP and down: server -> client; up: client -> server. The client end")
    print("is ours in (a) and (b). CPU counts every byte moved (HTTP + both iperf3).\n")
    print(header)
    print("-" * len(header))
    for case in cases:
        rows = results[case]
        medians[case] = {
            k: statistics.median(r[k] for r in rows) for k in ("http", "up", "down")
        }
        gib = sum(r["bytes"] for r in rows) / 2**30
        ends = [kind for kind in _ends_of(case) if kind != "kernel"]
        cpu = (
            ", ".join(
                f"{sum(r['cpu'][i] for r in rows) / gib:.2f} ({kind})"
                for i, kind in enumerate(ends)
            )
            or "-"
        )
        m = medians[case]
        print(
            f"{CASES[case]:36} {m['http']:11.1f} {m['up']:10.0f} {m['down']:12.0f}  {cpu}"
        )
    print()
    targets = {"a": 1.0, "b": 2.0}
    for case in cases:
        for base in ("c", "d"):
            if case == base or base not in medians or (base == "c" and case == "d"):
                continue
            ratio = {
                k: medians[case][k] / medians[base][k] for k in ("http", "up", "down")
            }
            target = (
                f"  target >= {targets[case]:.0f}x"
                if base == "c" and case in targets
                else ""
            )
            met = ""
            if target:
                met = "  met" if min(ratio.values()) >= targets[case] else "  NOT met"
            print(
                f"{case}/{base}: HTTP {ratio['http']:.3f}  up {ratio['up']:.3f}  "
                f"down {ratio['down']:.3f}{target}{met}"
            )
    if "k" in medians and "b" in medians:
        ratio = {k: medians["k"][k] / medians["b"][k] for k in ("http", "up", "down")}
        print(f"kernel backend vs our userspace datapath (k/b): HTTP {ratio['http']:.2f}"
              f"  up {ratio['up']:.2f}  down {ratio['down']:.2f}")
    print()
    for case in cases:
        for i, (largest, tree) in enumerate(rss.get(case, [])):
            print(
                f"peak RSS of our datapath {CASES[case][:3]} end {i + 1}: "
                f"largest process {largest:.1f} MiB, process tree {tree:.1f} MiB"
            )


def _ends_of(case):
    return {
        "a": ("ours", "wireguard-go"),
        "b": ("ours", "ours"),
        "c": ("wireguard-go", "wireguard-go"),
        "d": (),
        "e": ("ours", "kernel"),
        "k": ("kernel", "kernel"),
    }[case]


if __name__ == "__main__":
    sys.exit(main())
