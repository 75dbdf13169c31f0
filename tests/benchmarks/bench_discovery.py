"""What finding and choosing the cloudlet costs, measured in one run.

    python3 tests/benchmarks/bench_discovery.py [--rounds N]

zeroconf: the time `--zeroconf` adds to a start. Inside a namespace made
here (a veth pair with both ends inside: its own little LAN),
python-zeroconf announces a Tier 2 (the test cloudlet's deploy API) exactly
as upstream's Tier 2 does. `sinfonia-tier3 --json` then deploys on it,
given its URL (the baseline), and found by `--zeroconf` with the default
1 s and a 0.3 s `--zeroconf-timeout`, runs interleaved so that machine
noise hits them alike. The tool's own --debug figure for discovery is shown
too.

ranking: each candidate's handshake round trip as `--json --results 3`
reports it (HandshakeMs), against the delay that was set: a Tier 1
stand-in offers four deployments from cloudlets of their own, one whose
endpoint nobody serves and three real WireGuard responders, two of them
behind a relay that holds each datagram a set time each way (the kernel has
no netem). Also which candidate each round chose.

Needs root (namespaces) and python-zeroconf. All traffic stays on loopback
or inside the namespace.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

from checkout import REPO
from cloudlet import Candidates, Cloudlet, announce_tier2
from netns import Namespace, inside, missing_requirements, veth_pair

TOOL = str(REPO / "sinfonia_tier3.py")
TIER2_ADDRESS = "192.168.77.2"
ONE_WAY_DELAYS = {"dead": None, "relay 2x100 ms": 0.1, "relay 2x25 ms": 0.025, "direct": 0}


def timed_run(argv, env):
    """(seconds, CompletedProcess) of one run of `argv`."""
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120,
                            check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bench_discovery: {' '.join(argv)} failed: {result.stderr}")
    return elapsed, result


def bench_zeroconf(rounds, env):
    print("zeroconf: time of `sinfonia-tier3 --json ...` inside the namespace, "
          f"median [min-max] of {rounds} runs")
    with Namespace("st3zb") as lan:
        veth_pair(lan, lan, ["192.168.77.1/24"], [f"{TIER2_ADDRESS}/24"])
        with inside(lan):
            tier2, fallback = Cloudlet(host=TIER2_ADDRESS), Cloudlet()
        with tier2, fallback, announce_tier2(lan, TIER2_ADDRESS, tier2.url.rsplit(":", 1)[1]):
            prefix = ["ip", "netns", "exec", lan.name, sys.executable, TOOL]
            ways = {
                "Tier 2 URL given (baseline)": prefix + ["--json", tier2.url, "helloworld"],
                "--zeroconf (1 s)": prefix + ["--zeroconf", "--debug", "--json", fallback.url,
                                              "helloworld"],
                "--zeroconf-timeout 0.3": prefix + ["--zeroconf", "--zeroconf-timeout", "0.3",
                                                    "--debug", "--json", fallback.url,
                                                    "helloworld"],
            }
            times = {name: [] for name in ways}
            found = {name: [] for name in ways}
            for _ in range(rounds):
                for name, argv in ways.items():
                    elapsed, result = timed_run(argv, env)
                    times[name].append(elapsed)
                    match = re.search(r"zeroconf: (\d+) Tier 2 found in (\d+) ms",
                                      result.stderr)
                    if match:
                        if match.group(1) != "1":
                            raise SystemExit(f"bench_discovery: {name}: {result.stderr}")
                        found[name].append(int(match.group(2)))
            if fallback.requests:
                raise SystemExit("bench_discovery: zeroconf fell back to the Tier 1")
    baseline = statistics.median(times["Tier 2 URL given (baseline)"])
    print(f"  {'how':30} {'median s':>9} {'range s':>13} {'added s':>8} {'discovery ms':>13}")
    for name, values in times.items():
        median = statistics.median(values)
        discovery = f"{statistics.median(found[name]):.0f}" if found[name] else "-"
        print(f"  {name:30} {median:9.3f} {min(values):6.3f}-{max(values):6.3f} "
              f"{median - baseline:+8.3f} {discovery:>13}")


def bench_ranking(rounds, env):
    print(f"\nranking: handshake round trips from `--json --results 3`, {rounds} rounds")
    trips = {name: [] for name in ONE_WAY_DELAYS}
    chosen = {name: 0 for name in ONE_WAY_DELAYS}
    with Candidates(ONE_WAY_DELAYS) as tier1:
        for _ in range(rounds):
            _, result = timed_run([sys.executable, TOOL, "--json", "--results", "3",
                                   "--connect-timeout", "2", tier1.url, "helloworld"], env)
            documents = json.loads(result.stdout)
            chosen[documents[0]["DeploymentName"]] += 1
            for document in documents:
                trips[document["DeploymentName"]].append(document["HandshakeMs"])
    print(f"  {'candidate':16} {'set ms':>7} {'measured ms (median, range)':>28} "
          f"{'measured - set':>15} {'chosen':>7}")
    for name, delay in ONE_WAY_DELAYS.items():
        values = [v for v in trips[name] if v is not None]
        if delay is None or not values:
            answered = f"no answer in {len(trips[name]) - len(values)}/{rounds}"
            print(f"  {name:16} {'-':>7} {answered:>28} {'-':>15} {chosen[name]:>7}")
            continue
        median, set_ms = statistics.median(values), 2000 * delay
        print(f"  {name:16} {set_ms:7.1f} {median:10.1f} ({min(values):.1f}-{max(values):.1f})"
              f"{'':>5} {median - set_ms:+15.1f} {chosen[name]:>7}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        raise SystemExit(f"bench_discovery: cannot run here: {missing}")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, XDG_CACHE_HOME=cache)
        bench_zeroconf(options.rounds, env)
        bench_ranking(options.rounds, env)


if __name__ == "__main__":
    main()
