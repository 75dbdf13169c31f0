"""One backend, one tunnel: a second invocation for a backend whose session
runs joins that session (its command runs in the same namespaces, through
the same tunnel) instead of making a second tunnel with the same key, which
would take the cloudlet's one peer from the first. Real sessions against the
test cloudlet, as root and as an ordinary user; nothing is mocked.
"""

import os
import re
import select
import signal
import socket
import stat
import subprocess
import tempfile

import cloudlet
import pytest
import sessions
import test_e2e

import sinfonia_tier3 as st3

pytestmark = pytest.mark.recovery
tool = test_e2e.tool  # the tool's runner fixture: as root and as the test user
GREETING = test_e2e.GREETING

# One line per request to the helloworld backend: ok or failed.
FETCH = ('fetch() { curl -sS --max-time 5 -o /dev/null http://helloworld/ '
         '&& echo ok || echo failed; }; ')
WHERE = 'echo "$SINFONIA_ADDRESS $(readlink /proc/self/ns/net)"; '

# The first command: requests until the joined command says it runs (the
# file `joined` in the directory $1 both share), five more, then it ends.
FIRST = (FETCH + WHERE + 'echo $$ > "$1/first-pid"; i=0; '
         'while [ ! -e "$1/joined" ] && [ $i -lt 200 ]; do fetch; i=$((i+1)); sleep 0.1; '
         'done; for i in 1 2 3 4 5; do fetch; done; exit 3')
# The joined command, in the joiner's directory: requests while the first
# runs, and five more once the first command has ended (init has reaped
# it), through the tunnel that must still be up.
JOINED = (FETCH + WHERE + 'pwd -P; fetch; fetch; touch "$1/joined"; i=0; '
          'while kill -0 "$(cat "$1/first-pid")" 2>/dev/null && [ $i -lt 200 ]; do fetch; '
          'i=$((i+1)); sleep 0.1; done; for i in 1 2 3 4 5; do fetch; done; exit 5')

# sessions.SIGNAL_TRAP in sh (the test user's Python may be out of an
# application's reach, which has no capability to pass directories).
TRAP = ('trap \'echo got 15; exit 55\' TERM; echo ready; i=0; '
        'while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done')


@pytest.fixture(scope="module")
def cloudlet_url():
    with cloudlet.WireGuardServer("sinfonia") as server, \
            cloudlet.Cloudlet(wireguard=server) as api:
        yield api.url


def sockets_under(directory):
    """Unix socket files anywhere below `directory`."""
    return [os.path.join(path, name) for path, _, names in os.walk(directory)
            for name in names if stat.S_ISSOCK(os.lstat(os.path.join(path, name)).st_mode)]


def shared_directory(tool, tmp_path):
    """A new directory that the runner's applications may write to: the
    runner's user's own (root's applications have no CAP_DAC_OVERRIDE)."""
    path = os.path.join(tool.scratch if tool.as_user else str(tmp_path), "shared")
    os.mkdir(path)
    os.chown(path, tool.uid, tool.gid)
    return path


def application_namespaces(tool_pid):
    """{kind: inode} of the net, mnt and pid namespaces of the application
    below the tool `tool_pid` (the first process in another PID namespace)."""
    tool_pid_ns = os.stat(f"/proc/{tool_pid}/ns/pid").st_ino
    application = next(p for p in sessions.descendants(tool_pid)
                       if os.stat(f"/proc/{p}/ns/pid").st_ino != tool_pid_ns)
    return {kind: os.stat(f"/proc/{application}/ns/{kind}").st_ino
            for kind in ("net", "mnt", "pid")}


def stop(*processes):
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.e2e
def test_a_second_invocation_joins_and_the_session_ends_with_its_last_command(
        cloudlet_url, tool, tmp_path):
    shared = shared_directory(tool, tmp_path)
    first = tool.start(cloudlet_url, "helloworld", "--", "sh", "-c", FIRST, "sh", shared)
    joiners = []
    try:
        where = first.stdout.readline()
        assert re.fullmatch(r"10\.44\.\d+\.\d+ net:\[\d+\]\n", where), first.stderr.read()
        namespaces = application_namespaces(first.pid)

        # Signals to a joiner reach its command; its exit status is the command's.
        trap = tool.start(cloudlet_url, "helloworld", "--", "sh", "-c", TRAP)
        joiners.append(trap)
        stdout, stderr = sessions.signal_when_ready(trap, signal.SIGTERM, timeout=30)
        assert (trap.returncode, stdout) == (40 + signal.SIGTERM, "got 15\n"), stderr
        code, _, stderr = tool.run(cloudlet_url, "helloworld", "sinfonia-no-such-command")
        assert code == 127, stderr
        assert "sinfonia-tier3: sinfonia-no-such-command: command not found" in \
            stderr.splitlines(), stderr

        joined = tool.start(cloudlet_url, "helloworld", "--", "sh", "-c", JOINED, "sh",
                            shared)
        joiners.append(joined)
        assert joined.stdout.readline() == where, "same tunnel address, same namespace"
        assert joined.stdout.readline() == os.path.realpath(tool.scratch) + "\n"
        pids = sessions.descendants(first.pid) + sessions.descendants(joined.pid)
        first_out, first_err = first.communicate(timeout=60)
        joined_out, joined_err = joined.communicate(timeout=60)
    finally:
        stop(first, *joiners)
    assert first.returncode == 3, first_err
    assert joined.returncode == 5, joined_err
    assert "joined the running session" in joined_err and "deploying" not in joined_err
    assert "the application has ended; the session goes on" in first_err, first_err
    first_lines, joined_lines = first_out.splitlines(), joined_out.splitlines()
    assert set(first_lines) == {"ok"} and len(first_lines) >= 5, first_out
    assert set(joined_lines) == {"ok"} and len(joined_lines) >= 7, joined_out
    sessions.assert_nothing_left(pids, namespaces)
    assert sockets_under(tool.scratch) == [], "the session's socket went with it"
    if tool.as_user:
        assert sessions.files_of_user(tool.uid) == []


@pytest.mark.e2e
def test_a_killed_sessions_socket_is_replaced_and_other_key_caches_stay_apart(
        cloudlet_url, tool):
    runtime = os.path.join(tool.scratch, "run")  # one XDG_RUNTIME_DIR for every cache
    os.mkdir(runtime, 0o700)
    os.chown(runtime, tool.uid, tool.gid)

    def env(cache):
        return tool.env(cache, XDG_RUNTIME_DIR=runtime)

    first = tool.start(cloudlet_url, "helloworld", "--", "sh", "-c",
                       'echo "$SINFONIA_ADDRESS"; exec sleep 60', env=env("one"))
    joiners = []
    try:
        address = first.stdout.readline().strip()
        assert address, first.stderr.read()
        namespaces = application_namespaces(first.pid)
        pids = sessions.descendants(first.pid)
        looks = [tool.start("--json", cloudlet_url, "helloworld", env=env(cache))
                 for cache in ("one", "two")]
        (_, told), (_, untold) = (look.communicate(timeout=30) for look in looks)
        assert "a session of 00000000-0000-0000-0000-000000000000 runs here" in told, told
        assert "runs here" not in untold, untold

        other = tool.start(cloudlet_url, "helloworld", "--", "curl", "-sS", "--max-time", "10",
                           "http://helloworld/", env=env("two"))
        stdout, stderr = other.communicate(timeout=60)
        assert other.returncode == 0, stderr
        assert "deploying" in stderr and "joined" not in stderr
        assert GREETING.fullmatch(stdout).group(1) != address, "its own key and tunnel"

        joiner = tool.start(cloudlet_url, "helloworld", "--", "sh", "-c",
                            "echo joined; exec sleep 60", env=env("one"))
        joiners.append(joiner)
        assert joiner.stdout.readline() == "joined\n", joiner.stderr.read()
        pids += sessions.descendants(first.pid)
        first.kill()
        first.wait()
        _, stderr = joiner.communicate(timeout=30)
        assert (joiner.returncode, stderr.splitlines()[-1]) == (
            125, "sinfonia-tier3: the joined session ended before its command did"), stderr
        sessions.assert_nothing_left(pids, namespaces)
    finally:
        stop(first, *joiners)
    assert len(sockets_under(runtime)) == 1, "the killed session's socket stays"
    again = tool.start(cloudlet_url, "helloworld", "--", "curl", "-sS", "--max-time", "10",
                       "http://helloworld/", env=env("one"))
    stdout, stderr = again.communicate(timeout=60)
    assert again.returncode == 0, stderr
    assert "deploying" in stderr and "joined" not in stderr
    assert GREETING.fullmatch(stdout), stdout
    assert sockets_under(runtime) == []
    if tool.as_user:
        assert sessions.files_of_user(tool.uid) == []


@pytest.mark.e2e
def test_a_joiner_at_a_terminal_gives_its_command_a_terminal_of_its_own(
        cloudlet_url, tool, tmp_path):
    # /dev/tty opens only for a process with a controlling terminal.
    shared = shared_directory(tool, tmp_path)
    first = tool.start(cloudlet_url, "helloworld", "--", "sh", "-c",
                       'echo started; i=0; while [ ! -e "$1/done" ] && [ $i -lt 600 ]; '
                       'do sleep 0.1; i=$((i+1)); done', "sh", shared)
    try:
        assert first.stdout.readline() == "started\n", first.stderr.read()
        env = tool.env(SHELL="/bin/sh", TERM="dumb")
        status, shown = sessions.run_in_terminal([
            "env", "-i", *(f"{name}={env[name]}" for name in
                           ("XDG_CACHE_HOME", "HOME", "SHELL", "PATH", "TERM") if name in env),
            *tool.argv(cloudlet_url, "helloworld"),
        ], [
            ("sinfonia$ ", "curl -sS --max-time 10 http://helloworld/\n"),
            ("tunnel address is", '(: </dev/tty) && echo "ctty-$((6*7))"\n'),
            # Ctrl-C ends the job in the foreground (once it runs), not the shell.
            ("ctty-42", "sh -c 'echo nap$((1+1)); exec sleep 100'\n"),
            ("nap2", "\x03"),
            ("sinfonia$ ", f"touch {shared}/done; exit 3\n"),
        ], timeout=60)
        first.communicate(timeout=30)
    finally:
        stop(first)
    assert status == 3, shown
    assert "joined the running session" in shown, shown
    assert GREETING.search(shown.replace("\r\n", "\n")), shown
    assert first.returncode == 0

# Each command says it runs (a file in $1), waits until two do, fetches once.
TOGETHER = ('mktemp "$1/started.XXXXXX" >/dev/null; i=0; '
            'while [ "$(ls "$1" | wc -l)" -lt 2 ] && [ $i -lt 200 ]; do sleep 0.1; '
            'i=$((i+1)); done; curl -sS --max-time 5 -o /dev/null http://helloworld/ && echo ok')


@pytest.mark.e2e
def test_two_first_starts_at_once_make_one_session(cloudlet_url, tool, tmp_path):
    shared = shared_directory(tool, tmp_path)
    both = [tool.start(cloudlet_url, "helloworld", "--", "sh", "-c", TOGETHER, "sh", shared)
            for _ in range(2)]
    try:
        outputs = [process.communicate(timeout=60) for process in both]
    finally:
        stop(*both)
    assert [process.returncode for process in both] == [0, 0], outputs
    assert [stdout for stdout, _ in outputs] == ["ok\n", "ok\n"]
    errors = sorted(stderr for _, stderr in outputs)
    assert ["deploying" in e for e in errors] == [True, False], errors
    assert "joined the running session" in errors[1], errors


# A request to join: one message and three descriptors, as the tool sends it.
ASK_TO_JOIN = r'''
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect(sys.argv[1])
request = {"join": {"command": ["true"], "env": {}, "cwd": "/", "terminal": False}}
try:
    socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
    answer = sock.recv(4096).decode()
except (BrokenPipeError, ConnectionResetError):  # closed before or after the request
    answer = ""
print("answer:", answer or "none", flush=True)
'''


@pytest.mark.skipif(bool(sessions.missing_root()), reason=sessions.missing_root() or "ok")
def test_only_the_sessions_own_user_may_join():
    # The session's socket is in a 0700 directory of its user; here it is
    # open to all, so that another user reaches it and init's own check
    # (the peer's credentials) is the one that refuses.
    with tempfile.TemporaryDirectory() as directory, \
            socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "session")
        listener.bind(path)
        listener.listen(4)
        os.chmod(path, 0o777)
        joined = st3._JoinedCommands(listener, {})
        asker = subprocess.Popen(
            sessions.as_user([sessions.user_python(), "-c", ASK_TO_JOIN, path]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert select.select([listener], [], [], 20)[0], asker.stderr.read()
            joined.serve([listener])
            stdout, stderr = asker.communicate(timeout=20)
        finally:
            stop(asker)
    assert stdout == "answer: none\n", stderr
    assert joined.descriptors() == [listener] and joined.running() == 0


def test_the_sessions_socket_is_named_by_backend_and_key_cache(tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))

    def where(uuid, cache):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / cache))
        session = st3._SessionSocket(uuid)
        return session._directory, session._name

    one = where(cloudlet.HELLOWORLD, "one")
    assert one[0] == str(runtime / "sinfonia")
    assert one == where(cloudlet.HELLOWORLD, "one")
    assert one != where(cloudlet.HELLOWORLD, "two")
    assert one != where("00000000-0000-0000-0000-000000000001", "one")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/run")
    assert where(cloudlet.HELLOWORLD, "one")[0] == str(tmp_path / "one" / "sinfonia"), \
        "a runtime directory that is no absolute path: the key cache"



@pytest.mark.e2e
@pytest.mark.forward
def test_a_session_of_forwards_alone_is_joined_and_ends_with_its_signal(cloudlet_url, tool):
    first = tool.start("-L", "0:helloworld:80", cloudlet_url, "helloworld")
    try:
        (local,), _ = sessions.forwarding_addresses(first, 1, timeout=60)
        code, stdout, stderr = tool.run(cloudlet_url, "helloworld", "--", "sh", "-c",
                                        FETCH + "fetch")
        assert (code, stdout) == (0, "ok\n"), stderr
        code, _, stderr = tool.run("-L", "0:helloworld:80", cloudlet_url, "helloworld")
        assert code == 125, stderr
        assert "-L, -D and -R are set up by the session that deploys" in stderr, stderr
        page = subprocess.run(["curl", "-sS", "--max-time", "10", f"http://{local}/"],
                              capture_output=True, text=True, timeout=30, check=False)
        assert GREETING.match(page.stdout), page.stderr
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    finally:
        stop(first)
    assert first.returncode == 0
