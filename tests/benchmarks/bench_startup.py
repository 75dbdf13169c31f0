"""Start-up benchmark: this sinfonia-tier3 against upstream 0.7.4, side by side.

Prints the median wall time of `--version` and of a deploy against the test
cloudlet on loopback, for both clients in the same run (runs interleaved so
that machine noise hits both alike), and the ratio ours / upstream.

Upstream has no --json, so its deploy is measured with --config-debug (deploy,
write wg.conf and resolv.conf, exit); ours is measured both ways.

Each client runs from its own venv under the temp directory (upstream's
keyed by version, ours holding only pynacl and pyroute2 and running this
checkout's file), kept between runs and never inside the repository.

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

TESTS = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "benchmarks")]

from cloudlet import Cloudlet
from compiled import compiled_copy

UPSTREAM_VERSION = "0.7.4"


def venv_python(name, requirements):
    """The python of a venv under the temp directory holding `requirements`,
    made on first use and kept for later runs."""
    venv = pathlib.Path(tempfile.gettempdir()) / f"sinfonia-bench-{name}"
    python = venv / "bin" / "python"
    ready = venv / ".installed"
    wanted = " ".join(requirements)
    if not ready.exists() or ready.read_text() != wanted:
        print(f"installing {wanted} into {venv} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *requirements], check=True
        )
        ready.write_text(wanted)
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
    # Both run from a clean venv of their own, so neither pays for packages
    # that happen to be installed next to the interpreter.
    upstream_requirements = [f"sinfonia-tier3=={UPSTREAM_VERSION}"]
    upstream = [venv_python(f"upstream-{UPSTREAM_VERSION}", upstream_requirements)]
    upstream += ["-m", "sinfonia_tier3"]
    # Both as `python -m` with compiled bytecode, as pip installs them (ours: a
    # compiled copy of this checkout's module).
    ours = [venv_python("ours-deps", ["pynacl", "pyroute2"]), "-m", "sinfonia_tier3"]

    with tempfile.TemporaryDirectory() as scratch, Cloudlet() as cloudlet:
        env = dict(os.environ, XDG_CACHE_HOME=os.path.join(scratch, "cache"))
        env.pop("PYTHONPATH", None)
        our_env = dict(env, PYTHONPATH=compiled_copy(scratch))
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
            wall_time(our_command, scratch, our_env)  # warm caches, create keys
            wall_time(their_command, scratch, env)
            ours_times, theirs_times = [], []
            for _ in range(options.runs):
                ours_times.append(wall_time(our_command, scratch, our_env))
                theirs_times.append(wall_time(their_command, scratch, env))
            ours_ms = statistics.median(ours_times) * 1000
            theirs_ms = statistics.median(theirs_times) * 1000
            print(
                f"{name:48} {ours_ms:9.1f} {theirs_ms:12.1f} {ours_ms / theirs_ms:6.3f}x"
            )


if __name__ == "__main__":
    main()
