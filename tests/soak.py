"""A long session with steady traffic: no data lost, memory flat.

    python3 tests/soak.py [--seconds 600] [--rekey-after 120]

One session of the tool against the test cloudlet (our own responder),
whose application downloads the pattern stream of tests/netns.py (1 MiB a
request) from the helloworld backend for the whole time and checks the
sha256 of each download. Printed: the downloads (good, wrong, failed), the
bytes, the rekeys (handshakes the responder completed after the first), and
the tool's memory at the start and the end: the summed PSS and RSS of its
own processes (the tool and its datapath workers; not the namespace and the
application).

`--rekey-after` shortens the protocol's REKEY_AFTER_TIME (default its real
120 s) and with it REKEY_TIMEOUT, the least time between two handshakes
(a fifth of it, at most the real 5 s), through sessions.RUN_WITH: test-only
module constants, so that a short run sees the rekeys of a long one. The
default, 600 s at 120 s, is the real thing: five rekeys. The recovery tests
run a shortened form (`soak(...)`). Needs root.
"""

import argparse
import sys
import threading
import time

import cloudlet
import netns
import sessions

PATTERN_SIZE = 1 << 20

# The application: downloads URL over and over for SECONDS, checking each
# against SHA256; says "started" after the first, and the totals at the end.
DOWNLOADING = r"""
import hashlib, sys, time, urllib.request
url, expected, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
good = wrong = failed = total = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        with opener.open(url, timeout=10) as answer:
            data = answer.read()
    except OSError:
        failed += 1
        continue
    if hashlib.sha256(data).hexdigest() == expected:
        good += 1
        total += len(data)
    else:
        wrong += 1
    if good + wrong == 1:
        print("started", flush=True)
print("good", good, "wrong", wrong, "failed", failed, "bytes", total, flush=True)
"""


def tool_memory_kib(tool_pid):
    """(summed PSS, summed RSS) in KiB of the tool and its datapath workers."""
    pss = rss = 0
    for pid in [tool_pid, *sessions.datapath_workers(tool_pid)]:
        pss += _kib(f"/proc/{pid}/smaps_rollup", "Pss:")
        rss += _kib(f"/proc/{pid}/status", "VmRSS:")
    return pss, rss


def _kib(path, field):
    with open(path) as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise ValueError(f"no {field} in {path}")


def soak(seconds, rekey_after=120.0):
    """Run the session; a dict of what happened (see the module's docstring)."""
    settings = {}
    if rekey_after != 120.0:
        settings = {"_REKEY_AFTER_TIME": rekey_after,
                    "_REKEY_TIMEOUT": min(5.0, rekey_after / 5)}
    url = f"http://helloworld/pattern/{PATTERN_SIZE}"
    with sessions.tun_open_to_all(), sessions.user_directory() as scratch, \
            cloudlet.WireGuardServer() as server, cloudlet.Cloudlet(wireguard=server) as api:
        runner = sessions.Runner([], False, scratch)
        process = sessions.start_tool(
            runner, [api.url, "helloworld", "--", sessions.APPLICATION_PYTHON, "-c",
                     DOWNLOADING, url, netns.pattern_sha256(PATTERN_SIZE), str(seconds)],
            settings=settings)
        handshakes = []
        watching = threading.Event()

        def count_handshakes():
            while not watching.wait(0.1):
                (last,) = server.last_handshakes()
                if last and last != (handshakes[-1] if handshakes else None):
                    handshakes.append(last)

        watcher = threading.Thread(target=count_handshakes, daemon=True)
        try:
            started = process.stdout.readline()
            if started != "started\n":
                raise RuntimeError(f"the session did not start: {process.communicate()}")
            began = time.monotonic()
            watcher.start()
            memory_start = tool_memory_kib(process.pid)
            time.sleep(max(0.0, seconds - (time.monotonic() - began) - 2.0))
            memory_end = tool_memory_kib(process.pid)
            stdout, stderr = process.communicate(timeout=60)
        finally:
            watching.set()
            if process.poll() is None:
                process.kill()
                process.wait()
    words = stdout.split()
    totals = dict(zip(words[::2], map(int, words[1::2])))
    return dict(totals, rekeys=max(0, len(handshakes) - 1), status=process.returncode,
                stderr=stderr, memory_start=memory_start, memory_end=memory_end)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rekey-after", type=float, default=120.0)
    options = parser.parse_args(argv)
    if sessions.missing_root():
        sys.exit(f"soak: {sessions.missing_root()}")
    result = soak(options.seconds, options.rekey_after)
    print(f"{options.seconds:g} s session, rekey after {options.rekey_after:g} s: "
          f"{result['good']} good downloads of {PATTERN_SIZE} bytes "
          f"({result['bytes'] / 1e6:.0f} MB), {result['wrong']} wrong, "
          f"{result['failed']} failed, {result['rekeys']} rekeys, exit status "
          f"{result['status']}")
    for moment in ("start", "end"):
        pss, rss = result[f"memory_{moment}"]
        print(f"tool memory at the {moment}: PSS {pss / 1024:.1f} MiB, RSS {rss / 1024:.1f} MiB")
    if result["stderr"].count("\n") > 2:
        print(result["stderr"], file=sys.stderr, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
