"""Sessions that last: while the application keeps asking its backend, the
cloudlet drops the deployment, restarts with a new key and no memory, moves
its name to another address, a datapath worker dies, or the caller's own
address changes; the application, never restarted, gets its answers again.

Real parts throughout (tests/cloudlet.py: the deploy API, our responder or
wireguard-go, the backend in a namespace of its own). The only thing
shortened is how long an unanswered handshake or data takes to count as a
lost tunnel (QUICK_LOSS, module constants set through sessions.RUN_WITH,
test-only), so that each case takes seconds; bench_recovery.py measures
with the real bounds. Bounds here are generous: nothing is timed.
"""

import os

import cloudlet
import netns
import pytest
import sessions
import soak

pytestmark = [pytest.mark.recovery, pytest.mark.e2e]

if sessions.missing_root():
    pytest.skip(sessions.missing_root(), allow_module_level=True)

HELLO = "Hello from the sinfonia test cloudlet!"
QUICK_LOSS = {"_DATA_LOST_AFTER": 3.0, "_HANDSHAKE_LOST_AFTER": 3.0, "_RETRY_FIRST": 2.0}


@pytest.fixture
def scratch():
    with sessions.tun_open_to_all(), sessions.user_directory() as path:
        yield path


def _session(scratch, api, *options, as_user=False, prefix=(), url="http://helloworld/"):
    """The tool asking `api`'s helloworld, with QUICK_LOSS."""
    runner = sessions.Runner([], as_user, scratch)
    return sessions.AskingSession(runner, [*options, api.url, "helloworld"], prefix,
                                  settings=QUICK_LOSS, url=url)


def _check_lost_and_back(stderr):
    assert "sinfonia-tier3: tunnel lost: no answer to " in stderr, stderr
    assert "sinfonia-tier3: tunnel back after " in stderr, stderr


def _through(scratch, fault, implementation="sinfonia", server_options=None, **options):
    """A session through a new cloudlet, `fault(server, api, session)` once it
    answers; the tool's stderr once a request made after it is answered."""
    with cloudlet.WireGuardServer(implementation, **(server_options or {})) as server, \
            cloudlet.Cloudlet(wireguard=server, host=server.host) as api:
        session = _session(scratch, api, **options)
        try:
            session.after(lambda: fault(server, api, session))
        finally:
            stderr = session.end()
    return stderr


@pytest.mark.parametrize("as_user", [False, True], ids=["root", "user"])
def test_a_dropped_deployment_is_deployed_again_with_its_new_address(scratch, as_user):
    stderr = _through(scratch, lambda server, api, session: api.expire_all(),
                      as_user=as_user)
    _check_lost_and_back(stderr)
    # The cloudlet gave the new deployment a new address and port.
    assert "deployed again helloworld-" in stderr, stderr
    assert "address 10.44.0.3/32" in stderr, stderr


@pytest.mark.parametrize("implementation", ["sinfonia", "wireguard-go"])
def test_a_cloudlet_restarted_with_a_new_key_is_found_again(scratch, implementation):
    if implementation == "wireguard-go" and cloudlet.wireguard_go_missing():
        pytest.skip(cloudlet.wireguard_go_missing())
    stderr = _through(scratch, lambda server, api, session: api.restart(), implementation)
    _check_lost_and_back(stderr)
    assert "new cloudlet key" in stderr, stderr


def test_an_endpoint_name_that_moves_is_resolved_again(scratch):
    hosts = os.path.join(scratch, "hosts")
    with open(hosts, "w") as f:
        f.write("127.0.0.1 localhost\n127.0.0.1 cloudlet.test\n")

    def move(server, api, session):
        server.move("127.0.0.2")
        with open(hosts, "w") as f:  # in place: the bind mount shows it
            f.write("127.0.0.1 localhost\n127.0.0.2 cloudlet.test\n")

    stderr = _through(scratch, move, server_options={"name": "cloudlet.test"},
                      prefix=sessions.hosts_file_prefix(hosts))
    _check_lost_and_back(stderr)
    assert "nothing changed, cloudlet.test at 127.0.0.2" in stderr, stderr


def test_a_killed_datapath_worker_is_replaced(scratch):
    stderr = _through(scratch, lambda server, api, session:
                      sessions.kill_a_worker(session.process.pid))
    assert ("a WireGuard datapath worker ended (killed by signal 9); datapath restarted"
            in stderr), stderr


def test_the_callers_new_address_is_roamed_to(scratch):
    # The tool runs in a network namespace of its own; the cloudlet (API and
    # responder) listens on this side of the veth pair to it.
    with netns.CallerNetwork() as caller:
        stderr = _through(scratch, lambda server, api, session: caller.readdress(),
                          server_options={"host": caller.HOST}, prefix=caller.prefix)
    assert "tunnel lost" not in stderr, stderr


def test_no_reconnect_leaves_the_lost_tunnel_lost(scratch):
    with cloudlet.WireGuardServer() as server, cloudlet.Cloudlet(wireguard=server) as api:
        # By address: a request whose name lookup hangs would say nothing.
        session = _session(scratch, api, "--no-reconnect",
                           url=f"http://{cloudlet.HELLOWORLD_ADDRESS}/")
        try:
            session.first_good(0, 60)
            api.restart()
            answers = session.answers(2 * QUICK_LOSS["_DATA_LOST_AFTER"])
        finally:
            stderr = session.end()
    assert answers, "the application kept asking"
    assert [result for result, _, _ in answers[-3:]] == ["fail"] * 3, answers
    assert "tunnel lost" not in stderr, stderr


def test_a_shortened_soak_loses_nothing_and_keeps_its_memory():
    # tests/soak.py's long session, shortened: 25 s of downloads with the
    # protocol's rekey clock at 3 s instead of 120 s (test-only constants).
    result = soak.soak(25, rekey_after=3.0)
    assert result["status"] == 0, result["stderr"]
    assert "tunnel lost" not in result["stderr"], result["stderr"]
    assert result["good"] > 0 and result["wrong"] == result["failed"] == 0, result
    assert result["rekeys"] >= 5, result
    (pss_start, _), (pss_end, _) = result["memory_start"], result["memory_end"]
    assert pss_end <= pss_start + 2048, result  # KiB: warming up, not growing


@pytest.mark.forward
def test_a_forward_without_command_recovers_a_dropped_deployment(scratch):
    # No application: the tunnel keeper runs while the tool serves -L alone,
    # and the connections through the forward are what finds the loss.
    import signal
    import time
    import urllib.request

    def page(local):
        try:
            with urllib.request.urlopen(f"http://{local}/", timeout=3) as response:
                return response.read().decode()
        except OSError:
            return None

    with cloudlet.WireGuardServer() as server, \
            cloudlet.Cloudlet(wireguard=server, host=server.host) as api:
        runner = sessions.Runner([], False, scratch)
        process = sessions.start_tool(runner, ["-L", "0:helloworld:80", api.url, "helloworld"],
                                      settings=QUICK_LOSS)
        try:
            (local,), _ = sessions.forwarding_addresses(process, 1, timeout=60)
            assert page(local).startswith(HELLO)
            api.expire_all()
            deadline, back = time.monotonic() + 60, None
            while back is None and time.monotonic() < deadline:
                back = page(local)
                time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert back is not None and back.startswith(HELLO), stderr
    assert process.returncode == 0, stderr
    _check_lost_and_back(stderr)
