"""Running the tool as an ordinary user or in a terminal, and checking that
nothing is left afterwards.

The tests run as root; for the unprivileged runs they use the system user
`sinfonia-test` (created when missing), switch to it with setpriv, and open
/dev/net/tun to everyone for the duration of the run (it is 0600 on some
machines), restoring its mode afterwards.
"""

import contextlib
import errno
import os
import pty
import pwd
import queue
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

from checkout import REPO
from netns import require_programs

USER = "sinfonia-test"
TUN = "/dev/net/tun"
SCRATCH_PREFIX = "sinfonia-test-"  # the user's scratch directories in /tmp

# An application that says "ready", then leaves with 40+N on signal N.
SIGNAL_TRAP = r'''
import signal, sys, time
def leave(signum, frame):
    print("got", signum, flush=True)
    sys.exit(40 + signum)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, leave)
print("ready", flush=True)
time.sleep(60)
sys.exit(3)
'''


def signal_when_ready(process, signum, timeout):
    """Send `signum` to `process` once the SIGNAL_TRAP application in it has
    said "ready"; (stdout, stderr) of the rest. The process is gone after."""
    try:
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        process.send_signal(signum)
        return process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def missing_root():
    """Why unprivileged runs cannot be arranged here ('' when they can)."""
    if os.geteuid() != 0:
        return "needs root to switch to the test user and open /dev/net/tun to it"
    return ""


def tun_closed():
    """Why this process may not open /dev/net/tun ('' when it may): the
    userspace tunnel needs it (and without it `--tunnel auto` turns to sudo)."""
    try:
        os.close(os.open(TUN, os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return f"cannot open {TUN}: {e.strerror}"
    return ""


def user_ids():
    """(uid, gid) of the test user, created as a system user when missing."""
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        require_programs("useradd")
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/bin/sh", USER],
            check=True, capture_output=True,
        )
        entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


def as_user(argv):
    """`argv` run as the test user, with no supplementary groups."""
    require_programs("setpriv")
    uid, gid = user_ids()
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]


_PYTHON_CHECK = "import nacl.bindings, pyroute2"


def user_python():
    """An interpreter the test user can run, with pynacl and pyroute2.

    Debian's python3 with python3-nacl and python3-pyroute2 first (the
    oldest versions supported, and outside root's home, where this checkout's
    interpreter may live), then this checkout's interpreter.
    """
    for candidate in ("/usr/bin/python3", sys.executable):
        result = subprocess.run(as_user([candidate, "-c", _PYTHON_CHECK]),
                                capture_output=True, check=False)
        if result.returncode == 0:
            return candidate
    raise RuntimeError(
        f"no Python that {USER} can run has pynacl and pyroute2: "
        "apt-get install python3-nacl python3-pyroute2"
    )


class Runner:
    """Runs `python PROGRAM... ARGS...` from `scratch`, as root or as the
    test user (`as_user`), with a key cache of its own under `scratch`.

    `start(*args)` gives a Popen (stdin /dev/null, text stdout and stderr
    piped, the `env()` of `cache`, unless told otherwise), `run(*args)` its
    (status, stdout, stderr) once it ended (killed after `timeout`).
    """

    def __init__(self, program, as_user, scratch):
        self.program = list(program)
        self.as_user = as_user
        self.scratch = scratch
        self.python = user_python() if as_user else sys.executable
        self.uid, self.gid = user_ids() if as_user else (0, 0)

    def command(self, argv):
        """`argv` run as this runner's user."""
        return as_user(argv) if self.as_user else list(argv)

    def argv(self, *args):
        return self.command([self.python, *self.program, *args])

    def env(self, cache="cache", **extra):
        """The environment, with a key cache of its own (a new key per name)."""
        env = dict(os.environ, XDG_CACHE_HOME=os.path.join(self.scratch, cache), **extra)
        if self.as_user:
            env["HOME"] = self.scratch
        return env

    def start(self, *args, cache="cache", **kwargs):
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("env", self.env(cache))
        return subprocess.Popen(self.argv(*args), cwd=self.scratch, text=True, **kwargs)

    def run(self, *args, timeout=60, cache="cache"):
        process = self.start(*args, cache=cache)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        return process.returncode, stdout, stderr


@contextlib.contextmanager
def tun_open_to_all():
    """/dev/net/tun readable and writable by everyone while inside; the mode
    it had is restored afterwards (only if this changed it)."""
    mode = stat.S_IMODE(os.stat(TUN).st_mode)
    wanted = mode | 0o666
    if wanted != mode:
        os.chmod(TUN, wanted)
    try:
        yield
    finally:
        if wanted != mode:
            os.chmod(TUN, mode)


@contextlib.contextmanager
def user_directory():
    """A temporary directory owned by the test user (key cache, scratch)."""
    uid, gid = user_ids()
    path = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
    try:
        os.chown(path, uid, gid)
        os.chmod(path, 0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def files_of_user(uid, roots=("/tmp", "/var/tmp", "/dev/shm", "/run")):
    """Paths under `roots` owned by `uid` (what a run may have left behind),
    except the scratch directories of `user_directory` (this test's and those
    of tests running at the same time) and pytest's own temporary directory
    for that user (a developer running the suite as the test user)."""
    import pwd

    scratch = os.path.join(tempfile.gettempdir(), SCRATCH_PREFIX)
    pytest_tmp = os.path.join(tempfile.gettempdir(), f"pytest-of-{pwd.getpwuid(uid).pw_name}")
    found = []
    for root in roots:
        for directory, names, files in os.walk(root):
            if (directory + os.sep).startswith((scratch, pytest_tmp + os.sep)):
                continue
            for name in names + files:
                path = os.path.join(directory, name)
                if path.startswith(scratch) or path == pytest_tmp:
                    continue
                try:
                    if os.lstat(path).st_uid == uid:
                        found.append(path)
                except OSError:
                    pass
    return found


def namespaces_of(holder):
    """{kind: inode} of the net and mnt namespaces of the runner's namespace
    holder, and of the PID namespace its children are in."""
    return {kind: os.stat(f"/proc/{holder}/ns/{kind}").st_ino
            for kind in ("net", "mnt", "pid_for_children")}


def processes_in(namespaces):
    """Pids of every process on the machine inside any of those namespaces."""
    inodes = set(namespaces.values())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for kind in ("net", "mnt", "pid"):
            try:
                if os.stat(f"/proc/{entry}/ns/{kind}").st_ino in inodes:
                    found.append(int(entry))
                    break
            except OSError:
                pass
    return found


def descendants(pid):
    """Every live process below `pid` (children of children...)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def held_files(pid):
    """What the descriptors of process `pid` point at. A descriptor closed
    while being read (an interpreter starting up opens and closes many) is
    not held, and left out."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return held


def assert_nothing_left(pids, namespaces):
    """Assert that `pids` and every process in `namespaces` end (bounded)."""
    remaining = wait_until_gone(pids, namespaces)
    assert remaining == [], describe(remaining)


def wait_until_gone(pids, namespaces, timeout=10.0):
    """Wait (bounded) until none of `pids` lives and no process is in
    `namespaces`; returns what is still there. Call it right after the kill:
    processes started later are someone else's (pids and namespace inodes
    are reused on a busy machine)."""
    killed_at = _uptime()
    deadline = time.monotonic() + timeout
    while True:
        candidates = set(pids) | set(processes_in(namespaces))
        remaining = sorted(p for p in candidates if _alive_since_before(p, killed_at))
        if not remaining or time.monotonic() > deadline:
            return remaining
        time.sleep(0.05)


def describe(pids):
    """`pid: command line` of each process, for failure messages."""
    lines = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            command = "(gone)"
        lines.append(f"{pid}: {command}")
    return "\n".join(lines)


def _uptime():
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def _alive_since_before(pid, moment):
    """Whether `pid` runs (not a zombie) and was started before `moment`
    (seconds since boot)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return False
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return fields[0] != "Z" and started <= moment


_FORWARDING = re.compile(r"sinfonia-tier3: forwarding (\S+) .*\n")


def forwarding_addresses(process, count, timeout=30):
    """The listening addresses of the first `count` "forwarding" lines the
    tool (a Popen) says on stderr, read from its descriptor within
    `timeout`, and all it said until then."""
    said, deadline = b"", time.monotonic() + timeout
    while len(_FORWARDING.findall(said.decode(errors="replace"))) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0 and process.poll() is None, said.decode(errors="replace")
        if select.select([process.stderr], [], [], remaining)[0]:
            chunk = os.read(process.stderr.fileno(), 4096)
            assert chunk, said.decode(errors="replace")
            said += chunk
    text = said.decode()
    return _FORWARDING.findall(text), text


def run_in_terminal(argv, typed, timeout=20):
    """Run `argv` as the foreground job of a fresh pseudo-terminal; type
    `typed` (a list of (wait_for, text): type text once wait_for is shown;
    a callable instead of text is called with the pid) and return (status, everything shown)."""
    pid, master = pty.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    shown = b""
    matched = 0  # each wait_for is looked for after the previous one
    deadline = time.monotonic() + timeout
    try:
        for wait_for, text in typed:
            while wait_for.encode() not in shown[matched:]:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"never saw {wait_for!r} in {shown!r}"
                if select.select([master], [], [], remaining)[0]:
                    shown += os.read(master, 4096)
            matched = shown.index(wait_for.encode(), matched) + len(wait_for)
            if callable(text):
                text(pid)
            else:
                os.write(master, text.encode())
        while time.monotonic() < deadline:
            if select.select([master], [], [], deadline - time.monotonic())[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    chunk = b""
                if not chunk:
                    break
                shown += chunk
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(master)


def wait_until_stopped(pid, timeout=10.0):
    """Wait (bounded) until process `pid` is stopped (state T)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "T":
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop")
        time.sleep(0.02)


# Sessions whose application keeps asking its backend #########################

# python -c RUN_WITH TOOL SETTINGS ARGS...: the tool, with the module
# constants in SETTINGS (a Python dict literal) changed first. Test-only:
# how tests and benchmarks shorten the protocol's clocks and bounds.
RUN_WITH = """\
import ast, importlib.util, sys
spec = importlib.util.spec_from_file_location("sinfonia_tier3", sys.argv.pop(1))
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
for name, value in ast.literal_eval(sys.argv.pop(1)).items():
    assert hasattr(tool, name), name
    setattr(tool, name, value)
sys.exit(tool.main(sys.argv[1:]))
"""

def start_tool(runner, args, prefix=(), settings=None):
    """Popen of the tool with `args`, as `runner`'s user, after the command
    `prefix`, with the module constants `settings` (RUN_WITH); text stdout
    and stderr piped."""
    argv = runner.command([runner.python, "-c", RUN_WITH, str(REPO / "sinfonia_tier3.py"),
                           repr(settings or {}), *args])
    return subprocess.Popen([*prefix, *argv], env=runner.env(), cwd=runner.scratch,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# The application needs only the standard library: the system's Python
# (which any user may run), where there is one.
APPLICATION_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

# The application: asks URL every 0.1 s for at most LIFETIME seconds; one
# line per request: "ok" (the helloworld page came), "bad" or "fail", then
# when the request started and ended (CLOCK_MONOTONIC, which all the
# machine's processes share).
ASKING = r"""
import sys, time, urllib.request
url, lifetime = sys.argv[1], float(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + lifetime
while time.monotonic() < deadline:
    start = time.monotonic()
    try:
        with opener.open(url, timeout=1.0) as answer:
            good = answer.read().startswith(b"Hello from the sinfonia test cloudlet")
        result = "ok" if good else "bad"
    except OSError:
        result = "fail"
    print(result, start, time.monotonic(), flush=True)
    time.sleep(0.1)
"""


class AskingSession:
    """The tool (as `runner`'s user, after the command `prefix`) with the
    module constants `settings` (RUN_WITH), running ASKING on `url` as its
    application. `after(fault)` times a fault; `end()` stops it all."""

    def __init__(self, runner, args, prefix=(), settings=None, url="http://helloworld/",
                 lifetime=600):
        self.process = start_tool(runner, [*args, "--", APPLICATION_PYTHON, "-c", ASKING,
                                           url, str(lifetime)], prefix, settings)
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            result, start, end = line.split()
            self._lines.put((result, float(start), float(end)))
        self._lines.put(None)

    def answers(self, seconds):
        """(result, start, end) of each request that ends in the next `seconds`."""
        deadline, answers = time.monotonic() + seconds, []
        while True:
            try:
                answer = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return answers
            if answer is None:
                return answers
            answers.append(answer)

    def first_good(self, since, timeout):
        """When the first request started after `since` got its good answer."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no good answer in time"
            try:
                answer = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            assert answer is not None, f"the application ended: {self.end()}"
            result, start, end = answer
            if result == "ok" and start >= since:
                return end

    def after(self, fault, timeout=60):
        """Run `fault()` once the backend answers; the seconds from the fault
        to the application's first good answer after it."""
        self.first_good(0, 60)
        at = time.monotonic()
        fault()
        return self.first_good(at, timeout) - at

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


def datapath_workers(tool_pid):
    """The tool's children that stayed in its network namespace: the
    datapath's workers (the namespace holder has one of its own)."""
    own = os.stat(f"/proc/{tool_pid}/ns/net").st_ino
    with open(f"/proc/{tool_pid}/task/{tool_pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    return [pid for pid in children if os.stat(f"/proc/{pid}/ns/net").st_ino == own]


def kill_a_worker(tool_pid):
    """SIGKILL one of the tool's two datapath workers."""
    workers = datapath_workers(tool_pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)


def hosts_file_prefix(hosts):
    """A command prefix: run in a mount namespace of its own where `hosts`
    is bind-mounted on /etc/hosts, so that the endpoint's name is a real
    resolver lookup (glibc reads the file at each one) of a name the
    caller controls. Needs root."""
    require_programs("unshare", "mount")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/hosts && exec "$@"', hosts]
