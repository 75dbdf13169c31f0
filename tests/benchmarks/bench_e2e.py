"""Time from command to first response through the tunnel, and the client's memory.

    python3 tests/benchmarks/bench_e2e.py [--rounds N] [--server sinfonia|wireguard-go]
                                          [--upstream-venv DIR]

Three clients fetch `http://helloworld/` from one test cloudlet (tests/cloudlet.py),
measured round-robin in the same run so machine noise hits them alike:

  ours      python3 -m sinfonia_tier3 URL helloworld -- curl -sS http://helloworld/
            (a copy of the checkout's module with its bytecode, as installed)
  upstream  sinfonia-tier3 0.7.4 from PyPI (in a venv made on first use), same command
  bare      a wireguard-go tunnel set up by hand: the deploy POST, then `ip netns
            add`, wireguard-go, `wg set`, addresses, route and resolv.conf
            (tests/netns.py does exactly these steps), then curl in the namespace

Every run starts from nothing (new processes, new tunnel, new namespace). "cold"
uses a new client key, so the cloudlet makes a new deployment; "warm" repeats
with the key of the cold run. First response = the moment the page's last line
is on stdout. Memory = the client's own processes, sampled every 5 ms: the
process tree of the command without curl (for bare: wireguard-go); the peak of
their summed RSS, and of their summed PSS (shared pages counted once).

Targets from the issue: ours at most 0.25x upstream's time, and 35 MiB.
Needs root (bare uses named namespaces; upstream's rootless path works as root
too), curl, wireguard-go, wg. All UDP stays on the host's loopback.
"""

import argparse
import base64
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import checkout  # noqa: F401 - puts the repository root first on sys.path
import cloudlet
import sessions
from compiled import compiled_copy
from netns import (
    Namespace,
    WireguardGo,
    generate_keypair,
    missing_programs,
    missing_requirements,
    require_programs,
)

UPSTREAM_VERSION = "0.7.4"
PAGE_END = b"Your tunnel address is 10.44."
CURL = ["-sS", "--max-time", "10", "http://helloworld/"]
TARGET_RATIO = 0.25
TARGET_MIB = 35.0
RUN_TIMEOUT = 30.0
SAMPLE_INTERVAL = 0.005


# Memory of a process tree #####################################################


def _tree(root):
    return [root, *sessions.descendants(root)]


def _command_line(pid):
    """A short form of the process's command line, for failure messages."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().decode(errors="replace").split("\0")
    except OSError:
        return f"{pid} (gone)"
    return " ".join(
        os.path.basename(words[0]) if i == 0 else w for i, w in enumerate(words[:4])
    )


def _kib(path, field):
    """The `field:` line of a /proc file in KiB, 0 when the process is gone."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _identities(root):
    """(pid, program, whole command line) of each process of the tree: what
    an exec changes as well as what a fork or an exit does."""
    identities = []
    for pid in _tree(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command_line = f.read()
        except OSError:
            continue
        program = command_line.split(b"\0")[0].decode(errors="replace")
        identities.append((pid, program, command_line))
    return identities


class _MemorySampler(threading.Thread):
    """Peak summed RSS and PSS of the tree under `root`, minus `excluded` programs."""

    def __init__(self, root, excluded=("curl",)):
        super().__init__(daemon=True)
        self.root = root
        self.excluded = excluded
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.largest_rss_kib = 0
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            before = _identities(self.root)
            rss = pss = largest = 0
            for pid, program, _ in before:
                if os.path.basename(program) in self.excluded:
                    continue
                rss += _kib(f"/proc/{pid}/status", "VmRSS:")
                largest = max(largest, _kib(f"/proc/{pid}/status", "VmHWM:"))
                pss += _kib(f"/proc/{pid}/smaps_rollup", "Pss:")
            # A fork, exit or exec while reading moves shared pages between
            # processes read before and after it, which the sum would count
            # twice: such a sample is dropped.
            if _identities(self.root) == before:
                self.peak_rss_kib = max(self.peak_rss_kib, rss)
                self.peak_pss_kib = max(self.peak_pss_kib, pss)
                self.largest_rss_kib = max(self.largest_rss_kib, largest)
            self._done.wait(SAMPLE_INTERVAL)

    def stop(self):
        self._done.set()
        self.join()


# One run of each client #######################################################


class RunFailed(Exception):
    pass


def _time_command(argv, env, cwd, sample):
    """(seconds to the page's end on stdout, memory); memory is None unless
    `sample` (sampling costs CPU, so timed runs do without) and else (peak
    summed RSS, peak summed PSS, largest single RSS) in KiB."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=cwd
        )
        sampler = _MemorySampler(process.pid) if sample else None
        if sample:
            sampler.start()
        output, first = b"", None
        deadline = start + RUN_TIMEOUT
        try:
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise RunFailed(
                        f"no end of output within {RUN_TIMEOUT:.0f} s; still running: "
                        + ", ".join(_command_line(pid) for pid in _tree(process.pid))
                    )
                if not select.select([process.stdout], [], [], remaining)[0]:
                    continue
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
                if first is None and PAGE_END in output and output.endswith(b"\n"):
                    first = time.perf_counter() - start
            process.wait(max(1.0, deadline - time.perf_counter()))
        finally:
            if process.poll() is None:  # leave no stray helper behind
                for pid in reversed(_tree(process.pid)):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                process.wait()
            process.stdout.close()
            if sample:
                sampler.stop()
            stderr.seek(0)
            errors = stderr.read().decode(errors="replace").strip()
    if first is None:
        last = (
            errors.splitlines()[-1] if errors else f"exit status {process.returncode}"
        )
        raise RunFailed(f"no page on stdout ({last})")
    if not sample:
        return first, None
    return first, (sampler.peak_rss_kib, sampler.peak_pss_kib, sampler.largest_rss_kib)


def run_ours(url, env, cache, sample):
    argv = [
        sys.executable,
        "-m",
        "sinfonia_tier3",
        url,
        "helloworld",
        "--",
        "/usr/bin/curl",
        *CURL,
    ]
    return _time_command(argv, dict(env, XDG_CACHE_HOME=cache), cache, sample)


def run_upstream(venv, url, cache, sample):
    # Upstream runs `python -m sinfonia_tier3.netns_helper`: a working directory
    # holding our sinfonia_tier3.py would shadow its package, hence cwd=cache.
    # It execs the command without a PATH search, hence /usr/bin/curl.
    argv = [
        str(venv / "bin" / "sinfonia-tier3"),
        url,
        "helloworld",
        "/usr/bin/curl",
        *CURL,
    ]
    return _time_command(argv, dict(os.environ, XDG_CACHE_HOME=cache), cache, sample)


def run_bare(url, keypair):
    """The deploy POST and a wireguard-go tunnel by hand; as _time_command."""
    try:
        return _bare(url, keypair)
    except (
        OSError,
        ValueError,
        LookupError,
        RuntimeError,
        subprocess.SubprocessError,
    ) as e:
        raise RunFailed(f"{type(e).__name__}: {e}") from None


def _bare(url, keypair):
    private, public = keypair
    start = time.perf_counter()
    key = base64.urlsafe_b64encode(public).decode().rstrip("=")
    request = urllib.request.Request(
        f"{url}/api/v1/deploy/{cloudlet.HELLOWORLD}/{key}", method="POST"
    )
    with urllib.request.urlopen(request, timeout=RUN_TIMEOUT) as response:
        config = json.loads(response.read())[0]["TunnelConfig"]
    host, _, port = config["endpoint"].rpartition(":")
    with Namespace("st3be") as namespace:
        etc = Path("/etc/netns") / namespace.name
        etc.mkdir(parents=True)
        try:
            nameservers = [d for d in config["dns"] if d[0].isdigit()]
            domains = [d for d in config["dns"] if not d[0].isdigit()]
            (etc / "resolv.conf").write_text(
                "".join(f"nameserver {n}\n" for n in nameservers)
                + f"search {' '.join(domains)}\n"
            )
            with WireguardGo(namespace, config["address"], private_key=private) as wg:
                for network in config["allowedIPs"]:
                    namespace.ip("route", "add", network, "dev", wg.name)
                wg.set_peer(
                    base64.b64decode(config["publicKey"]),
                    endpoint=(host, int(port)),
                    allowed_ips=config["allowedIPs"],
                )
                page = namespace.run(["curl", *CURL], timeout=RUN_TIMEOUT, check=False)
                first = time.perf_counter() - start
                rss = _kib(f"/proc/{wg.pid}/status", "VmHWM:")
                memory = (rss, _kib(f"/proc/{wg.pid}/smaps_rollup", "Pss:"), rss)
        finally:
            shutil.rmtree(etc, ignore_errors=True)
    if PAGE_END.decode() not in page:
        raise RunFailed(f"no page from curl ({page.strip()[:80]!r})")
    return first, memory


# The upstream client ###########################################################


def upstream_venv(directory):
    """A venv with sinfonia-tier3 0.7.4 (made on first use); (path, None) or
    (None, why not)."""
    venv = Path(directory)
    tool = venv / "bin" / "sinfonia-tier3"
    if not tool.exists():
        print(
            f"installing sinfonia-tier3=={UPSTREAM_VERSION} into {venv} ...",
            file=sys.stderr,
        )
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            subprocess.run(
                [
                    str(venv / "bin" / "pip"),
                    "install",
                    "-q",
                    f"sinfonia-tier3=={UPSTREAM_VERSION}",
                ],
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            detail = detail.decode(errors="replace").strip().splitlines()[-1:] or [
                str(e)
            ]
            return None, f"cannot install it: {detail[0]}"
    if missing_programs("unshare"):
        return None, missing_programs("unshare")
    return venv, None


# Main ##########################################################################


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--server",
        choices=("sinfonia", "wireguard-go"),
        default="sinfonia",
        help="the cloudlet's WireGuard server (the same for all clients)",
    )
    parser.add_argument(
        "--upstream-venv",
        default=os.path.join(
            tempfile.gettempdir(), f"sinfonia-bench-upstream-{UPSTREAM_VERSION}"
        ),
    )
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"bench_e2e: cannot run here: {missing}")
        return 1
    require_programs("wireguard-go", "wg", "curl")

    venv, upstream_missing = upstream_venv(args.upstream_venv)
    clients = ["ours", "upstream", "bare"] if venv else ["ours", "bare"]
    times = {(c, k): [] for c in clients for k in ("cold", "warm")}
    memory = {}
    failures = {}
    try:
        server = cloudlet.WireGuardServer(args.server)
    except (ImportError, OSError, RuntimeError) as e:
        print(f"bench_e2e: cannot start the cloudlet: {e}")
        return 1
    with (
        server,
        cloudlet.Cloudlet(wireguard=server) as api,
        tempfile.TemporaryDirectory() as scratch,
    ):
        ours_env = dict(os.environ, PYTHONPATH=compiled_copy(scratch))
        # Round 0 warms the caches and samples memory; rounds 1.. are timed.
        for round_number in range(args.rounds + 1):
            for client in clients:
                cache = tempfile.mkdtemp(dir=scratch)
                keypair = generate_keypair()
                sample = round_number == 0
                for kind in ("cold", "warm"):
                    try:
                        if client == "ours":
                            seconds, used = run_ours(api.url, ours_env, cache, sample)
                        elif client == "upstream":
                            seconds, used = run_upstream(venv, api.url, cache, sample)
                        else:
                            seconds, used = run_bare(api.url, keypair)
                    except RunFailed as e:
                        failures.setdefault((client, kind), []).append(str(e))
                        continue
                    if round_number:
                        times[client, kind].append(seconds)
                    if used is not None:
                        memory[client] = tuple(
                            map(max, zip(memory.get(client, used), used))
                        )
    _report(args, times, memory, failures, upstream_missing)
    return 0


def _median(values):
    return statistics.median(values) if values else None


def _report(args, times, memory, failures, upstream_missing):
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"bench_e2e: {args.rounds} rounds, the cloudlet's WireGuard server: {args.server}, "
        f"{os.cpu_count()} CPUs, load average {load}"
    )
    print("time from command to first response: median [min-max] over the rounds")
    labels = {
        "ours": "ours",
        "upstream": f"upstream {UPSTREAM_VERSION}",
        "bare": "bare wireguard-go by hand",
    }
    medians = {}
    for (client, kind), runs in times.items():
        label = f"  {labels[client] + ' ' + kind:32}"
        if not runs:
            print(
                f"{label} not measured: {failures.get((client, kind), ['no run'])[0]}"
            )
            continue
        medians[client, kind] = statistics.median(runs)
        failed = failures.get((client, kind), [])
        note = (
            f"  ({len(failed)} failed run(s), warm-up included: {failed[0]})"
            if failed
            else ""
        )
        print(
            f"{label} {medians[client, kind]:6.3f} s  [{min(runs):.3f}-{max(runs):.3f}]{note}"
        )
    if upstream_missing:
        print(f"  upstream {UPSTREAM_VERSION}: not measured: {upstream_missing}")
    for kind in ("cold", "warm"):
        ours = medians.get(("ours", kind))
        for other in ("upstream", "bare"):
            theirs = medians.get((other, kind))
            if ours is None or theirs is None:
                print(f"  ours/{other} {kind}: not available")
                continue
            verdict = ""
            if other == "upstream":
                met = ours / theirs <= TARGET_RATIO
                verdict = f"  (target <= {TARGET_RATIO}: {'met' if met else 'NOT met'})"
            print(f"  ours/{other} {kind}: {ours / theirs:.4f}{verdict}")
    print(
        "peak memory of the client's own processes (not curl), sampled every "
        f"{SAMPLE_INTERVAL * 1000:.0f} ms in an untimed cold and warm run:"
    )
    for client, label in labels.items():
        if client not in memory:
            if client in ("ours", "bare") or not upstream_missing:
                print(f"  {label:32} not measured")
            continue
        rss, pss, largest = (kib / 1024 for kib in memory[client])
        verdict = ""
        if client == "ours":
            # Judged on PSS: summed RSS counts the interpreter pages that the
            # tool's forked processes share once per process.
            met = "met" if pss <= TARGET_MIB else "NOT met"
            verdict = f"  (target <= {TARGET_MIB:.0f} MiB summed PSS: {met})"
        print(
            f"  {label:32} RSS {rss:6.1f} MiB summed, PSS {pss:6.1f} MiB, "
            f"largest process {largest:5.1f} MiB{verdict}"
        )


if __name__ == "__main__":
    sys.exit(main())
