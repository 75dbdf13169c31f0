"""What each datapath technique buys: our datapath with one technique taken
away at a time, against the full datapath and wireguard-go, in one run.

    python3 tests/benchmarks/bench_datapath.py [--rounds N] [--seconds S]

Variants, each ours <-> ours between two namespaces (UDP on loopback):
  full          UDP GSO/GRO, TUN with IFF_VNET_HDR (coalesced GSO writes),
                libsodium via cffi into preallocated buffers
  no-coalesce   TUN without IFF_VNET_HDR: one write per packet
  no-gso        no UDP GSO on send nor GRO on receive: one syscall per datagram
  bindings      crypto through nacl.bindings (allocating) instead of cffi
and wireguard-go <-> wireguard-go as the baseline. Measured round-robin
(iperf3 one way, client -> server), so machine noise hits all alike; prints
medians and ratios against the baseline and against `full`.

Needs root, iperf3, wireguard-go and wg. Traffic stays on loopback and
inside the namespaces made here.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
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
)

import sinfonia_tier3 as st3

CLIENT, SERVER = "10.98.0.1", "10.98.0.2"
VARIANTS = ("full", "no-coalesce", "no-gso", "bindings", "wireguard-go")


def _without_udp_offloads(sock, level, option, value):
    """`_try_setsockopt` as on a kernel without UDP GSO/GRO."""
    if level == st3._SOL_UDP and option in (st3._UDP_SEGMENT, st3._UDP_GRO):
        return False
    return _try_setsockopt(sock, level, option, value)


_try_setsockopt = st3._try_setsockopt


def _ours(stack, client_ns, server_ns, variant):
    (client_private, client_public), (server_private, server_public) = (
        generate_keypair(),
        generate_keypair(),
    )
    vnet_hdr = variant != "no-coalesce"
    st3._try_setsockopt = _without_udp_offloads if variant == "no-gso" else _try_setsockopt
    st3._TransportCipher.__init__.__defaults__ = (variant != "bindings",)
    try:
        server = stack.enter_context(OurDatapath(
            server_ns, [f"{SERVER}/24"], server_private, client_public,
            allowed_ips=[f"{CLIENT}/32"], vnet_hdr=vnet_hdr))
        client = stack.enter_context(OurDatapath(
            client_ns, [f"{CLIENT}/24"], client_private, server_public,
            allowed_ips=[f"{SERVER}/32"], endpoint=server.endpoint, vnet_hdr=vnet_hdr))
        server.start()
        client.start()  # the workers forked now keep the variant's settings
    finally:
        st3._try_setsockopt = _try_setsockopt
        st3._TransportCipher.__init__.__defaults__ = (True,)
    client.datapath.wait_for_handshake(10)


def _theirs(stack, client_ns, server_ns):
    (client_private, client_public), (server_private, server_public) = (
        generate_keypair(),
        generate_keypair(),
    )
    client = stack.enter_context(
        WireguardGo(client_ns, [f"{CLIENT}/24"], private_key=client_private))
    server = stack.enter_context(
        WireguardGo(server_ns, [f"{SERVER}/24"], private_key=server_private))
    client.set_peer(server_public, endpoint=server.endpoint, allowed_ips=[f"{SERVER}/32"])
    server.set_peer(client_public, allowed_ips=[f"{CLIENT}/32"])


def _measure(variant, seconds):
    """Mbit/s of one iperf3 run client -> server through a fresh tunnel."""
    with ExitStack() as stack:
        client_ns = stack.enter_context(Namespace("st3dc"))
        server_ns = stack.enter_context(Namespace("st3ds"))
        if variant == "wireguard-go":
            _theirs(stack, client_ns, server_ns)
        else:
            _ours(stack, client_ns, server_ns, variant)
        server_ns.popen(["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL)
        time.sleep(0.3)
        report = json.loads(client_ns.run(
            ["iperf3", "-c", SERVER, "-t", str(seconds), "-J"], timeout=seconds + 30))
        return report["end"]["sum_received"]["bits_per_second"] / 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds (3)")
    parser.add_argument("--seconds", type=int, default=4, help="each iperf3 run (4 s)")
    args = parser.parse_args(argv)
    reason = missing_requirements()
    if reason:
        print(f"bench_datapath: skipped: {reason}", file=sys.stderr)
        return 0
    require_programs("wireguard-go", "wg", "iperf3")
    results = {variant: [] for variant in VARIANTS}
    for round_number in range(args.rounds):
        for variant in VARIANTS:
            results[variant].append(_measure(variant, args.seconds))
            print(f"round {round_number + 1} {variant}: {results[variant][-1]:.0f} Mbit/s",
                  file=sys.stderr, flush=True)
    medians = {variant: statistics.median(values) for variant, values in results.items()}
    print(f"\nDatapath techniques, iperf3 {args.seconds} s client -> server, "
          f"medians of {args.rounds} rounds\n")
    print(f"{'variant':<14}{'Mbit/s':>9}{'vs full':>10}{'vs wireguard-go':>18}")
    for variant in VARIANTS:
        print(f"{variant:<14}{medians[variant]:>9.0f}"
              f"{medians[variant] / medians['full']:>10.2f}"
              f"{medians[variant] / medians['wireguard-go']:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
