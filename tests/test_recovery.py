"""Sessions that last: while the application keeps asking its backend, the
cloudlet drops the deployment, restarts with a new key and no memory, moves
its name to another address, a datapath worker dies, or the caller's own
address changes; the application, never restarted, gets its answers again.

Real parts throughout (tests/cloudlet.py: the deploy API, our responder or
wireguard-go, the backend in a namespace of its own). The only thing
shortened is how long an unanswered handshake or data takes to count as a
lost tunnel (module constants set by RUN_SHORTENED, test-only), so that each
case takes seconds; bench_recovery.py measures with the real bounds.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import cloudlet
import netns
import pytest
import sessions
from checkout import REPO

pytestmark = [pytest.mark.recovery, pytest.mark.e2e]

TOOL = str(REPO / "sinfonia_tier3.py")

if sessions.missing_root():
    pytest.skip(sessions.missing_root(), allow_module_level=True)

# python -c RUN_SHORTENED TOOL SETTINGS ARGS...: the tool, with the module
# constants in SETTINGS (a Python dict literal) changed first.
RUN_SHORTENED = """\
import ast, importlib.util, sys
spec = importlib.util.spec_from_file_location("sinfonia_tier3", sys.argv.pop(1))
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
for name, value in ast.literal_eval(sys.argv.pop(1)).items():
    assert hasattr(tool, name), name
    setattr(tool, name, value)
sys.exit(tool.main(sys.argv[1:]))
"""
QUICK_LOSS = {"_DATA_LOST_AFTER": 3.0, "_HANDSHAKE_LOST_AFTER": 3.0, "_RETRY_FIRST": 2.0}

# The application needs only the standard library: the system's Python
# (which any user may run), where there is one.
APPLICATION_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
# The application: asks http://helloworld/ every 0.2 s (bounded in time)
# and says how each request went, one line each.
ASKING = r"""
import sys, time, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    try:
        with opener.open("http://helloworld/", timeout=1.5) as answer:
            good = answer.read().startswith(b"Hello from the sinfonia test cloudlet")
        print("ok" if good else "bad", flush=True)
    except OSError as e:
        print("fail", type(e).__name__, flush=True)
    time.sleep(0.2)
"""


class AskingSession:
    """The tool (as `runner`'s user, after `prefix`) running ASKING as its
    application; `lines` gets its output."""

    def __init__(self, runner, args, prefix=(), settings=QUICK_LOSS, lifetime=120):
        argv = runner.command([runner.python, "-c", RUN_SHORTENED, TOOL, repr(settings),
                               *args, "--", APPLICATION_PYTHON, "-c", ASKING, str(lifetime)])
        self.process = subprocess.Popen(
            [*prefix, *argv], env=runner.env(), cwd=runner.scratch,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def next_line(self, deadline):
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the application said nothing in time"
        try:
            line = self.lines.get(timeout=remaining)
        except queue.Empty:
            line = None
        assert line is not None, f"the application ended: {self.end()}"
        return line

    def lines_for(self, seconds):
        """What the application says in the next `seconds`."""
        deadline, lines = time.monotonic() + seconds, []
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return lines
            if line is None:
                return lines
            lines.append(line)

    def wait_for_ok(self, timeout):
        """Until the application got a good answer (bounded); the lines before it."""
        deadline = time.monotonic() + timeout
        before = []
        while (line := self.next_line(deadline)) != "ok":
            before.append(line)
        return before

    def after(self, fault, timeout=60):
        """Run `fault()` once the backend answers; then wait until a request
        made after it is answered. The lines in between."""
        self.wait_for_ok(60)
        fault()
        deadline = time.monotonic() + timeout
        self.next_line(deadline)  # may have been on its way before the fault
        return self.wait_for_ok(deadline - time.monotonic())

    def end(self):
        """Stop the session (SIGTERM reaches the application); its stderr."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, stderr = self.process.communicate(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        return stderr


@pytest.fixture
def scratch():
    with sessions.tun_open_to_all(), sessions.user_directory() as path:
        yield path


def _tool(as_user, scratch):
    return sessions.Runner([], as_user, scratch)


def _session(runner, api, *args, **kwargs):
    return AskingSession(runner, [*args, api.url, "helloworld"], **kwargs)


def _check_lost_and_back(stderr):
    assert "sinfonia-tier3: tunnel lost: no answer to " in stderr, stderr
    assert "sinfonia-tier3: tunnel back after " in stderr, stderr


@pytest.mark.parametrize("as_user", [False, True], ids=["root", "user"])
def test_a_dropped_deployment_is_deployed_again_with_its_new_address(scratch, as_user):
    runner = _tool(as_user, scratch)
    with cloudlet.WireGuardServer() as server, cloudlet.Cloudlet(wireguard=server) as api:
        session = _session(runner, api)
        try:
            def drop():
                (path,) = [path for method, path, _ in api.requests if method == "POST"]
                request = urllib.request.Request(api.url + path.split("?")[0],
                                                 method="DELETE")
                with urllib.request.urlopen(request, timeout=10) as answer:
                    assert answer.status == 204

            session.after(drop)
        finally:
            stderr = session.end()
    _check_lost_and_back(stderr)
    # The cloudlet gave the new deployment a new address and port.
    assert "deployed again helloworld-" in stderr, stderr
    assert "address 10.44.0.3/32" in stderr, stderr


@pytest.mark.parametrize("implementation", ["sinfonia", "wireguard-go"])
def test_a_cloudlet_restarted_with_a_new_key_is_found_again(scratch, implementation):
    if implementation == "wireguard-go" and cloudlet.wireguard_go_missing():
        pytest.skip(cloudlet.wireguard_go_missing())
    runner = _tool(False, scratch)
    with cloudlet.WireGuardServer(implementation) as server, \
            cloudlet.Cloudlet(wireguard=server) as api:
        session = _session(runner, api)
        try:
            session.after(api.restart)
        finally:
            stderr = session.end()
    _check_lost_and_back(stderr)
    assert "new cloudlet key" in stderr, stderr


def test_an_endpoint_name_that_moves_is_resolved_again(scratch):
    # The tool resolves the endpoint's name through the /etc/hosts of a mount
    # namespace of its own, where the test's file is bind-mounted: a real
    # resolver lookup (glibc reads the file at each lookup), of a name the
    # test controls.
    netns.require_programs("unshare", "mount")
    hosts = os.path.join(scratch, "hosts")
    with open(hosts, "w") as f:
        f.write("127.0.0.1 localhost\n127.0.0.1 cloudlet.test\n")
    runner = _tool(False, scratch)
    with cloudlet.WireGuardServer(name="cloudlet.test") as server, \
            cloudlet.Cloudlet(wireguard=server) as api:
        session = AskingSession(runner, [api.url, "helloworld"], prefix=[
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/hosts && exec "$@"', hosts])
        try:
            def move():
                server.move("127.0.0.2")
                with open(hosts, "w") as f:  # in place: the bind mount shows it
                    f.write("127.0.0.1 localhost\n127.0.0.2 cloudlet.test\n")

            session.after(move)
        finally:
            stderr = session.end()
    _check_lost_and_back(stderr)
    assert "nothing changed, cloudlet.test at 127.0.0.2" in stderr, stderr


def _datapath_workers(tool_pid):
    """The tool's children that stayed in its network namespace: the
    datapath's workers (the namespace holder has one of its own)."""
    own = os.stat(f"/proc/{tool_pid}/ns/net").st_ino
    with open(f"/proc/{tool_pid}/task/{tool_pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    return [pid for pid in children if os.stat(f"/proc/{pid}/ns/net").st_ino == own]


def test_a_killed_datapath_worker_is_replaced(scratch):
    runner = _tool(False, scratch)
    with cloudlet.WireGuardServer() as server, cloudlet.Cloudlet(wireguard=server) as api:
        session = _session(runner, api)
        try:
            def kill_a_worker():
                workers = _datapath_workers(session.process.pid)
                assert len(workers) == 2, workers
                os.kill(workers[-1], signal.SIGKILL)

            session.after(kill_a_worker)
            replaced = _datapath_workers(session.process.pid)
        finally:
            stderr = session.end()
    assert len(replaced) == 2
    assert ("a WireGuard datapath worker ended (killed by signal 9); datapath restarted"
            in stderr), stderr


def test_the_callers_new_address_is_roamed_to(scratch):
    # The tool runs in a network namespace of its own, joined to this one by
    # a veth pair; the cloudlet (API and responder) listens on this side.
    runner = _tool(False, scratch)
    with netns.Namespace("st3rc") as caller:
        outside, inside = netns.unique_name("st3ro"), netns.unique_name("st3ri")
        subprocess.run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside,
                        "netns", caller.name], check=True)
        try:  # the pair goes with the namespace, or here
            subprocess.run(["ip", "address", "add", "10.97.0.1/24", "dev", outside],
                           check=True)
            subprocess.run(["ip", "link", "set", outside, "up"], check=True)
            caller.add_addresses(inside, ["10.97.0.2/24"])
            # The new address stays when the old one goes (by default the
            # kernel removes an address's secondaries with it).
            caller.run(["sysctl", "-q", f"net.ipv4.conf.{inside}.promote_secondaries=1"])
            caller.ip("route", "add", "default", "via", "10.97.0.1")
            with cloudlet.WireGuardServer(host="10.97.0.1") as server, \
                    cloudlet.Cloudlet(wireguard=server, host="10.97.0.1") as api:
                session = AskingSession(runner, [api.url, "helloworld"],
                                        prefix=["ip", "netns", "exec", caller.name])
                try:
                    def readdress():
                        caller.ip("address", "add", "10.97.0.3/24", "dev", inside)
                        caller.ip("address", "del", "10.97.0.2/24", "dev", inside)

                    session.after(readdress)
                finally:
                    stderr = session.end()
        finally:
            subprocess.run(["ip", "link", "del", outside], check=False,
                           capture_output=True)
    assert "tunnel lost" not in stderr, stderr


def test_no_reconnect_leaves_the_lost_tunnel_lost(scratch):
    runner = _tool(False, scratch)
    with cloudlet.WireGuardServer() as server, cloudlet.Cloudlet(wireguard=server) as api:
        session = _session(runner, api, "--no-reconnect")
        try:
            session.wait_for_ok(60)
            api.restart()
            lines = session.lines_for(3 * QUICK_LOSS["_DATA_LOST_AFTER"])
        finally:
            stderr = session.end()
    # (A request may hang in the resolver for all of it: then it says nothing.)
    assert "ok" not in lines, lines
    assert "tunnel lost" not in stderr, stderr
