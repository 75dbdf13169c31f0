"""End to end: `sinfonia-tier3 URL helloworld COMMAND` against the test
cloudlet (tests/cloudlet.py: the deploy API on loopback, and a WireGuard
server, DNS and the helloworld backend in a namespace of its own), as root and
as an ordinary user, with our own WireGuard responder and with wireguard-go on
the cloudlet's side. Nothing is mocked: the page travels through the real
tunnel, the application runs in real namespaces.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import venv
import zipapp

import cloudlet
import pytest
import sessions
from checkout import REPO
from netns import require_programs

pytestmark = pytest.mark.e2e

TOOL = str(REPO / "sinfonia_tier3.py")
GREETING = re.compile(
    r"Hello from the sinfonia test cloudlet!\nYour tunnel address is (10\.44\.\d+\.\d+)\.\n")

if sessions.missing_root():
    pytest.skip(sessions.missing_root(), allow_module_level=True)


@pytest.fixture
def curl():
    """The application that fetches the page through the tunnel."""
    require_programs("curl")
    return ["curl", "-sS", "--max-time", "10", "http://helloworld/"]


@pytest.fixture(scope="module", params=["sinfonia", "wireguard-go"])
def cloudlet_url(request):
    """The deploy URL of a cloudlet whose WireGuard side is ours or wireguard-go."""
    if request.param == "wireguard-go" and cloudlet.wireguard_go_missing():
        pytest.skip(cloudlet.wireguard_go_missing())
    with cloudlet.WireGuardServer(request.param) as server, \
            cloudlet.Cloudlet(wireguard=server) as api:
        yield api.url


@pytest.fixture(params=["root", "user"])
def tool(request):
    """`python sinfonia_tier3.py ARGS` as root or as the test user, each run
    in its own key cache (sessions.Runner)."""
    as_user = request.param == "user"
    with sessions.tun_open_to_all(), sessions.user_directory() as scratch:
        yield sessions.Runner([TOOL], as_user, scratch)


def test_the_page_comes_back_through_the_tunnel(cloudlet_url, tool, curl):
    code, stdout, stderr = tool.run(
        cloudlet_url, "helloworld", "--", "sh", "-c",
        '"$@" && echo "$SINFONIA_ADDRESS $SINFONIA_UUID $SINFONIA_TIER1_URL '
        '$SINFONIA_DEPLOYMENT"', "-", *curl)
    assert code == 0, stderr
    page = GREETING.match(stdout)
    assert page, stdout
    deployment = re.search(r"deployed (\S+) \(Deployed\)", stderr).group(1)
    assert stdout[page.end():] == (
        f"{page.group(1)} {cloudlet.HELLOWORLD} {cloudlet_url} {deployment}\n")


def test_the_applications_exit_status_comes_back(cloudlet_url, tool):
    code, _, stderr = tool.run(cloudlet_url, "helloworld", "sh", "-c", "exit 7")
    assert code == 7, stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_to_the_tool_reach_the_application(tool, signum):
    with cloudlet.WireGuardServer("sinfonia") as server, \
            cloudlet.Cloudlet(wireguard=server) as api:
        process = tool.start(api.url, "helloworld", "--",
                             tool.python, "-c", sessions.SIGNAL_TRAP)
        stdout, stderr = sessions.signal_when_ready(process, signum, timeout=30)
    assert stdout == f"got {int(signum)}\n", stderr
    assert process.returncode == 40 + signum


def test_a_sigkilled_tool_leaves_nothing_behind(cloudlet_url, tool):
    process = tool.start(cloudlet_url, "helloworld", "--", "sh", "-c",
                         "sleep 300 & echo started; wait")
    try:
        assert process.stdout.readline() == "started\n", process.stderr.read()
        pids = sessions.descendants(process.pid)
        tool_pid_ns = os.stat(f"/proc/{process.pid}/ns/pid").st_ino
        application = next(p for p in pids
                            if os.stat(f"/proc/{p}/ns/pid").st_ino != tool_pid_ns)
        namespaces = {kind: os.stat(f"/proc/{application}/ns/{kind}").st_ino
                      for kind in ("net", "mnt", "pid")}
        process.kill()
        process.wait()
        sessions.assert_nothing_left(pids, namespaces)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if tool.as_user:
        assert sessions.files_of_user(tool.uid) == []


def test_a_dead_endpoint_fails_before_the_application_starts(tool):
    # The default WireGuard side of the test cloudlet: an endpoint nobody serves.
    marker = os.path.join(tool.scratch, "started")
    with cloudlet.Cloudlet() as api:
        code, _, stderr = tool.run("--connect-timeout", "1", api.url, "helloworld",
                                   "touch", marker)
    assert code == 125
    assert re.fullmatch(
        r"sinfonia-tier3: the cloudlet did not answer at its endpoint 127\.0\.0\.1:\d+ "
        r"within 1 s: check that UDP to it gets through, or allow more time with "
        r"--connect-timeout", stderr.splitlines()[-1]), stderr
    assert not os.path.exists(marker)


def test_ten_sessions_at_once_each_through_its_own_tunnel(tool, curl):
    with cloudlet.WireGuardServer("sinfonia") as server, \
            cloudlet.Cloudlet(wireguard=server) as api:
        processes = [tool.start(api.url, "helloworld", "--", *curl, cache=f"cache{i}")
                     for i in range(10)]
        pids = []
        try:
            for process in processes:
                pids += sessions.descendants(process.pid)
            outputs = [process.communicate(timeout=90) for process in processes]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    assert [p.returncode for p in processes] == [0] * 10, [e for _, e in outputs]
    addresses = {GREETING.fullmatch(stdout).group(1) for stdout, _ in outputs}
    assert len(addresses) == 10, "ten keys, ten tunnels, ten addresses"
    sessions.assert_nothing_left(pids, {})
    if tool.as_user:
        assert sessions.files_of_user(tool.uid) == []


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_no_command_gives_an_interactive_shell_with_job_control(tool, shell, curl):
    # bash reads /etc/bash.bashrc, which sets a prompt of its own.
    with cloudlet.WireGuardServer("sinfonia") as server, \
            cloudlet.Cloudlet(wireguard=server) as api:
        env = tool.env(SHELL=shell, TERM="dumb")
        status, shown = sessions.run_in_terminal([
            "env", "-i", *(f"{name}={env[name]}" for name in
                           ("XDG_CACHE_HOME", "HOME", "SHELL", "PATH", "TERM") if name in env),
            *tool.argv(api.url, "helloworld"),
        ], [
            ("sinfonia$ ", " ".join(curl) + "\n"),
            ("tunnel address is", "sleep 30\n"),
            ("sleep 30", "\x03"),  # Ctrl-C ends the sleep, not the shell
            ("sinfonia$ ", "echo still here\n"),
            ("still here", "exit 3\n"),
        ], timeout=60)
    assert status == 3, shown
    assert GREETING.search(shown.replace("\r\n", "\n")), shown


# Every way users run it ######################################################


def _link_modules(directory, *modules):
    """Symlinks in `directory` to the packages (or extension files) of
    `modules`, as this interpreter has them."""
    for module in modules:
        source = module.__file__
        if os.path.basename(source) == "__init__.py":
            source = os.path.dirname(source)
        os.symlink(source, os.path.join(directory, os.path.basename(source)))


def _nacl_only_path(scratch):
    """A directory with pynacl (and cffi's backend) but no pyroute2, so that
    a zipapp's own pyroute2 is the only one."""
    import _cffi_backend
    import nacl

    path = os.path.join(scratch, "nacl-only")
    os.mkdir(path)
    _link_modules(path, nacl, _cffi_backend)
    return path


def _installed_script(scratch):
    # A wheel built offline from a copy of the project, by this interpreter
    # (whose setuptools .ci/run provides: the new venv's base may have none
    # that builds wheels), then installed into a new venv.
    project = os.path.join(scratch, "project")
    os.mkdir(project)
    for name in ("sinfonia_tier3.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, project)
    dist = os.path.join(scratch, "dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--wheel-dir", dist, project],
                   check=True, capture_output=True, timeout=300)
    environment = os.path.join(scratch, "venv")
    venv.create(environment, with_pip=False)
    python = os.path.join(environment, "bin", "python")
    # pynacl (with cffi's backend) and pyroute2 from where this interpreter
    # has them, not its base's; only them: a .pth to this interpreter's whole
    # site-packages would show pip this project as installed there already.
    import _cffi_backend
    import nacl
    import pyroute2

    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    _link_modules(site, nacl, _cffi_backend, pyroute2)
    (wheel,) = os.listdir(dist)
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                    "--no-deps", "--no-index", os.path.join(dist, wheel)],
                   check=True, capture_output=True, timeout=300)
    return [os.path.join(environment, "bin", "sinfonia-tier3")], {}


def _python_m(scratch):
    return [sys.executable, "-m", "sinfonia_tier3"], {"PYTHONPATH": str(REPO)}


def _vendored(scratch):
    vendor = os.path.join(scratch, "myapp", "_vendor")
    os.makedirs(vendor)
    for package in (os.path.dirname(vendor), vendor):
        open(os.path.join(package, "__init__.py"), "w").close()
    shutil.copy(TOOL, vendor)
    code = "import sys; from myapp._vendor import sinfonia_tier3; sys.exit(sinfonia_tier3.main())"
    return [sys.executable, "-c", code], {"PYTHONPATH": scratch}


def _zipapp(scratch):
    import pyroute2

    source = os.path.join(scratch, "zipapp")
    os.mkdir(source)
    shutil.copy(TOOL, source)
    shutil.copytree(os.path.dirname(pyroute2.__file__), os.path.join(source, "pyroute2"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    # Not main="sinfonia_tier3:main": zipapp's generated __main__ drops the
    # return value, so every exit status would be 0. The README says the same.
    with open(os.path.join(source, "__main__.py"), "w") as f:
        f.write("import sys\nimport sinfonia_tier3\nsys.exit(sinfonia_tier3.main())\n")
    archive = os.path.join(scratch, "sinfonia-tier3.pyz")
    zipapp.create_archive(source, archive)
    # -S: no site-packages, so pyroute2 can only come from the archive.
    return [sys.executable, "-S", archive], {"PYTHONPATH": _nacl_only_path(scratch)}


@pytest.mark.parametrize("way", [_installed_script, _python_m, _vendored, _zipapp],
                         ids=["installed-script", "python-m", "vendored", "zipapp"])
def test_every_way_of_running_it_gets_the_page(way, tmp_path, curl):
    scratch = str(tmp_path)
    argv, env = way(scratch)
    with cloudlet.WireGuardServer("sinfonia") as server, \
            cloudlet.Cloudlet(wireguard=server) as api:
        result = subprocess.run(
            [*argv, api.url, "helloworld", "--", "sh", "-c", '"$@"; exit 7', "sh", *curl],
            env=dict(os.environ, **env), cwd=scratch, capture_output=True, text=True,
            timeout=60, check=False,
        )
    assert result.returncode == 7, result.stderr
    assert GREETING.fullmatch(result.stdout), result.stdout
