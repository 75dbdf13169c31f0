"""How long a running application waits for its backend after a fault.

    python3 tests/benchmarks/bench_recovery.py [--rounds N] [--case NAME ...]

For each case one session runs an application that asks the helloworld
backend (by address, so that no name lookup stalls it) every 0.1 s through
the test cloudlet (tests/cloudlet.py); N times (default 5), once it gets
answers, a fault, then the time until a request made after the fault is
answered. The tool runs with its real bounds (nothing shortened). Printed:
per case the median, fastest and slowest of the N, against the target
(under 20 s for each case, under 5 s for a restarted worker).

Cases:
  drop         the cloudlet DELETEs the deployment (as an expiry): a new
               deployment, with a new address and port
  restart      the cloudlet restarts with a new key and no memory (our responder)
  restart-wg   the same with wireguard-go as the cloudlet's WireGuard
  name-moves   the endpoint's name resolves to another address (a hosts
               file bind-mounted over /etc/hosts in the tool's mount namespace)
  worker       a datapath worker is killed
  roaming      the caller's address changes (the tool in a namespace of its own)

Needs root (namespaces, mounts), wireguard-go for restart-wg.
"""

import argparse
import contextlib
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import checkout  # noqa: F401 - puts the repository root first on sys.path
import cloudlet
import netns
import sessions

TARGETS = {"worker": 5.0}
TARGET = 20.0
URL = f"http://{cloudlet.HELLOWORLD_ADDRESS}/"


@contextlib.contextmanager
def _plain(implementation="sinfonia", **server_options):
    with cloudlet.WireGuardServer(implementation, **server_options) as server, \
            cloudlet.Cloudlet(wireguard=server, host=server.host) as api:
        yield server, api


def case_drop(scratch):
    with _plain() as (_, api):
        yield api, [], lambda session: api.expire_all()


def case_restart(scratch, implementation="sinfonia"):
    with _plain(implementation) as (_, api):
        yield api, [], lambda session: api.restart()


def case_restart_wg(scratch):
    yield from case_restart(scratch, "wireguard-go")


def case_name_moves(scratch):
    hosts = os.path.join(scratch, "hosts")
    addresses = ["127.0.0.1", "127.0.0.2"]

    def write_hosts():
        with open(hosts, "w") as f:  # in place: the bind mount shows it
            f.write(f"127.0.0.1 localhost\n{addresses[0]} cloudlet.test\n")

    def move(session):
        addresses.reverse()
        server.move(addresses[0])
        write_hosts()

    write_hosts()
    with _plain(name="cloudlet.test") as (server, api):
        yield api, sessions.hosts_file_prefix(hosts), move


def case_worker(scratch):
    with _plain() as (_, api):
        yield api, [], lambda session: sessions.kill_a_worker(session.process.pid)


def case_roaming(scratch):
    with netns.CallerNetwork() as caller, _plain(host=caller.HOST) as (_, api):
        yield api, caller.prefix, lambda session: caller.readdress()


CASES = {name[5:].replace("_", "-"): function for name, function in globals().items()
         if name.startswith("case_")}


def measure(name, rounds):
    """The seconds from each fault to the first good answer, and the tool's stderr."""
    with sessions.tun_open_to_all(), sessions.user_directory() as scratch:
        case = CASES[name](scratch)
        api, prefix, fault = next(case)
        try:
            runner = sessions.Runner([], False, scratch)
            session = sessions.AskingSession(runner, [api.url, "helloworld"], prefix, url=URL)
            try:
                times = [session.after(lambda: fault(session), timeout=120)
                         for _ in range(rounds)]
            finally:
                stderr = session.end()
        finally:
            case.close()
    return times, stderr


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    options = parser.parse_args(argv)
    if sessions.missing_root():
        sys.exit(f"bench_recovery: {sessions.missing_root()}")
    names = options.case or list(CASES)
    if "restart-wg" in names and cloudlet.wireguard_go_missing():
        print(f"restart-wg skipped: {cloudlet.wireguard_go_missing()}", file=sys.stderr)
        names.remove("restart-wg")
    rows = []
    for name in names:
        times, stderr = measure(name, options.rounds)
        target = TARGETS.get(name, TARGET)
        median = statistics.median(times)
        rows.append((name, median, min(times), max(times), target))
        if os.environ.get("BENCH_VERBOSE"):
            print(stderr, file=sys.stderr)
    print(f"time from fault to the first good answer, seconds (median of {options.rounds})")
    print(f"{'case':<12} {'median':>7} {'fastest':>8} {'slowest':>8} {'target':>7}  met")
    for name, median, fastest, slowest, target in rows:
        print(f"{name:<12} {median:7.2f} {fastest:8.2f} {slowest:8.2f} {target:7.0f}  "
              f"{'yes' if median < target else 'NO'}")
    return 0 if all(row[1] < row[4] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
