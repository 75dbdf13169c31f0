"""Start-up benchmark: this sinfonia-tier3 against upstream 0.7.4, side by side.

Prints the median wall time of `--version` and of a deploy against the test
cloudlet on loopback, for both clients in the same run (runs interleaved so
that machine noise hits both alike), and the ratio ours / upstream.

Upstream has no --json, so its deploy is measured with --config-debug (deploy,
write wg.conf and resolv.conf, exit); ours is measured both ways.

Upstream is installed with pip into a venv under the temp directory, kept
between runs (keyed by version) and never inside the repository.

    python tests/benchmarks/bench_startup.py [--runs N]
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from cloudlet import Cloudlet

UPSTREAM_VERSION = "0.7.4"


def upstream_python():
    """The python of a venv holding upstream sinfonia-tier3, made on first use."""
    venv = (
        pathlib.Path(tempfile.gettempdir())
        / f"sinfonia-bench-upstream-{UPSTREAM_VERSION}"
    )
    python = venv / "bin" / "python"
    ready = venv / ".installed"
    if not ready.exists():
        print(
            f"installing upstream sinfonia-tier3 {UPSTREAM_VERSION} into {venv} ...",
            file=sys.stderr,
        )
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                f"sinfonia-tier3=={UPSTREAM_VERSION}",
            ],
            check=True,
        )
        ready.write_text("")
    return str(python)


def wall_time(command, cwd, env):
    """Seconds for one run of `command`, which must succeed."""
    started = time.perf_counter()
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, timeout=120, check=False
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed ({result.returncode}):\n"
            + result.stderr.decode(errors="replace")[-2000:]
        )
    return elapsed


def main():
    parser = argparse.ArgumentParser(description="start-up time, ours vs upstream")
    parser.add_argument("--runs", type=int, default=11)
    options = parser.parse_args()
    upstream = [upstream_python(), "-m", "sinfonia_tier3"]
    ours = [sys.executable, str(ROOT / "sinfonia_tier3.py")]

    with tempfile.TemporaryDirectory() as scratch, Cloudlet() as cloudlet:
        env = dict(os.environ, XDG_CACHE_HOME=os.path.join(scratch, "cache"))
        env.pop("PYTHONPATH", None)
        cases = [
            ("--version", ours + ["--version"], upstream + ["--version"]),
            (
                "deploy: ours --json, upstream --config-debug",
                ours + ["--json", cloudlet.url, "helloworld"],
                upstream + ["--config-debug", cloudlet.url, "helloworld"],
            ),
            (
                "deploy: --config-debug, both",
                ours + ["--config-debug", cloudlet.url, "helloworld"],
                upstream + ["--config-debug", cloudlet.url, "helloworld"],
            ),
        ]
        print(
            f"python {sys.version.split()[0]}, {options.runs} runs each, median wall time"
        )
        print(f"{'case':48} {'ours ms':>9} {'upstream ms':>12} {'ratio':>7}")
        for name, our_command, their_command in cases:
            for command in (our_command, their_command):  # warm caches, create keys
                wall_time(command, scratch, env)
            ours_times, theirs_times = [], []
            for _ in range(options.runs):
                ours_times.append(wall_time(our_command, scratch, env))
                theirs_times.append(wall_time(their_command, scratch, env))
            ours_ms = statistics.median(ours_times) * 1000
            theirs_ms = statistics.median(theirs_times) * 1000
            print(
                f"{name:48} {ours_ms:9.1f} {theirs_ms:12.1f} {ours_ms / theirs_ms:6.3f}x"
            )


if __name__ == "__main__":
    main()
