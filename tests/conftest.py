"""Shared fixtures: an isolated key cache for every test, the test cloudlet,
and a runner for the command line as a user starts it."""

import os
import subprocess
import sys

import pytest
from checkout import REPO  # which puts this checkout's module first on sys.path
from cloudlet import Cloudlet


@pytest.fixture(autouse=True)
def key_cache(tmp_path, monkeypatch):
    """Every test (and every CLI it starts) gets its own $XDG_CACHE_HOME, so
    no test reads or writes the user's real keys; and no $XDG_RUNTIME_DIR,
    so that sessions meet in that cache, not in the user's runtime directory."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return cache / "sinfonia"


@pytest.fixture
def cloudlet():
    """A well-behaved test cloudlet on loopback; tests switch misbehaviour on."""
    with Cloudlet() as running:
        yield running


def run_cli(*args, cwd=None, timeout=60, env=None):
    """Run `python sinfonia_tier3.py ARGS` the way a user would; the
    CompletedProcess with text stdout and stderr."""
    return subprocess.run(
        [sys.executable, str(REPO / "sinfonia_tier3.py"), *map(str, args)],
        check=False,
        cwd=cwd,
        env=env if env is not None else dict(os.environ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
