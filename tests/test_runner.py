"""The namespace runner on its own: real user, network, mount and PID
namespaces, a real TUN device, real processes and signals, as root and as an
ordinary user. No WireGuard here (test_e2e.py has the whole path): the TUN
descriptor that the runner hands out is read directly.

Each run goes through a small driver program, started as a separate process
(as root, or as the test user through setpriv), that uses the runner the way
the tunnels (`_UserspaceTunnel`, `_KernelTunnel`) do.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest
import sessions
from checkout import REPO
from netns import Child, Namespace, require_programs, veth_pair

import sinfonia_tier3 as st3

DRIVER = r'''
import json, os, select, sys
sys.path.insert(0, sys.argv[1])
import sinfonia_tier3 as st3
spec = json.loads(sys.argv[2])
sys.executable = spec.get("executable", sys.executable)  # as in an embedding program
interface, move_link = st3._TunInside(), None
if "moved_link" in spec:
    interface = st3._LinkMovedIn(spec["moved_link"]["name"])
    def move_link(pid):
        os.system(spec["moved_link"]["move"].replace("PID", str(pid)))
status = 125
try:
    with st3._Namespace(interface, mtu=spec.get("mtu", 1420)) as namespace:
        fds = namespace.receive_interface(move_link)
        tun_fd = fds[0] if fds else None
        namespace.configure(spec["addresses"], spec["routes"], spec.get("resolv_conf"))
        print(json.dumps({"holder": namespace.pid}), file=sys.stderr, flush=True)
        if not spec.get("capture"):
            status = namespace.run(spec["command"], spec.get("env", {}))
        else:  # the first IPv4 packet (IPv6 has link-local chatter), while it runs
            namespace.start(spec["command"], dict(os.environ, **spec.get("env", {})))
            for _ in range(100):
                if not select.select([tun_fd], [], [], 10)[0]:
                    break
                packet = os.read(tun_fd, 65536)
                if packet[0] >> 4 == 4:
                    with open(spec["capture"], "w") as f:
                        f.write(packet.hex())
                    break
            status = namespace.wait()
except st3.SinfoniaError as e:
    print(f"sinfonia-tier3: {e}", file=sys.stderr)
    status = e.exit_status
sys.exit(status)
'''

ADDRESSES = ["10.77.0.2/32", "fd77::2/128"]
ROUTES = ["0.0.0.0/0", "::/0"]
RESOLV_CONF = "nameserver 10.77.0.1\nsearch ns.svc.cluster.local svc.cluster.local\n"

needs_root = pytest.mark.skipif(bool(sessions.missing_root()),
                                reason=sessions.missing_root() or "ok")


@pytest.fixture(scope="module")
def driver_file():
    """The driver program, readable by the test user too, alone in its
    directory (which Python puts first on sys.path)."""
    directory = tempfile.mkdtemp(prefix="sinfonia-driver-")
    try:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "driver.py")
        with open(path, "w") as f:
            f.write(DRIVER)
        os.chmod(path, 0o644)
        yield path
    finally:
        shutil.rmtree(directory)


@pytest.fixture(params=["root", "user"])
def runner(request, driver_file):
    """Runs the driver as root or as the test user (sessions.Runner); its
    argument is a `driver_spec`."""
    if sessions.missing_root():
        pytest.skip(sessions.missing_root())
    as_user = request.param == "user"
    # Root's application has no CAP_DAC_OVERRIDE: its scratch is root's own.
    scratch = sessions.user_directory() if as_user else tempfile.TemporaryDirectory()
    with sessions.tun_open_to_all(), scratch as path:
        yield sessions.Runner([driver_file, str(REPO)], as_user, path)


def driver_spec(spec):
    """The driver's argument: `spec` over the default addresses, routes and
    resolv.conf."""
    return json.dumps({"addresses": ADDRESSES, "routes": ROUTES, "resolv_conf": RESOLV_CONF,
                       **spec})


INSPECT = r'''
import json, os, socket, subprocess
def ip(*args):
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout)
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
    icmp = True
except OSError:
    icmp = False
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(),
    "capabilities": {name: status[name].strip() for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")},
    "pid": os.getpid(), "ppid": os.getppid(),
    "proc_pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "links": {link["ifname"]: link for link in ip("link", "show")},
    "addresses": sorted(a["local"] + "/" + str(a["prefixlen"]) for link in ip("addr", "show") for a in link["addr_info"] if a.get("scope") != "link"),
    "routes4": ip("route", "show"), "routes6": ip("-6", "route", "show"),
    "resolv_conf": open("/etc/resolv.conf").read(),
    "own_file_uid": os.stat(os.environ["OWN_FILE"]).st_uid,
    "env": os.environ.get("SINFONIA_TEST"),
    "icmp": icmp,
}))
'''


def test_the_application_runs_as_the_caller_in_its_own_namespaces(runner):
    require_programs("ip")  # INSPECT's
    own_file = os.path.join(runner.scratch, "mine")
    with open(own_file, "w"):
        pass
    os.chown(own_file, runner.uid, runner.gid)
    code, stdout, stderr = runner.run(driver_spec({
        "command": [runner.python, "-c", INSPECT], "mtu": 1400,
        "env": {"OWN_FILE": own_file, "SINFONIA_TEST": "yes"},
    }))
    assert code == 0, stderr
    seen = json.loads(stdout)
    assert (seen["uid"], seen["gid"], seen["own_file_uid"]) == (runner.uid, runner.gid, runner.uid)
    none = "0000000000000000"
    assert seen["capabilities"] == {"CapInh": none, "CapPrm": none, "CapEff": none,
                                    "CapBnd": none, "CapAmb": none, "NoNewPrivs": "1"}, \
        "no capability, as root too, and no way to gain one"
    assert seen["ppid"] == 1, "the namespace's init is the parent"
    assert len(seen["proc_pids"]) < 10, f"a fresh /proc for the new PID namespace: {seen['proc_pids']}"
    assert set(seen["links"]) == {"lo", "sinfonia0"}
    assert "UP" in seen["links"]["lo"]["flags"]
    assert "UP" in seen["links"]["sinfonia0"]["flags"]
    assert seen["links"]["sinfonia0"]["mtu"] == 1400
    assert seen["addresses"] == sorted(["127.0.0.1/8", "::1/128", *ADDRESSES])
    assert [(r["dst"], r["dev"]) for r in seen["routes4"]] == [("default", "sinfonia0")]
    assert ("default", "sinfonia0") in [(r["dst"], r["dev"]) for r in seen["routes6"]]
    assert seen["resolv_conf"] == RESOLV_CONF
    assert seen["env"] == "yes"
    assert seen["icmp"], "ping sockets are open to the caller's group"
    with open("/etc/resolv.conf") as f:
        assert f.read() != RESOLV_CONF, "the host's resolv.conf is untouched"


def test_routes_follow_the_allowed_ips(runner):
    require_programs("ip")  # INSPECT's
    code, stdout, stderr = runner.run(driver_spec({
        "command": [runner.python, "-c", INSPECT], "env": {"OWN_FILE": "/"},
        "addresses": ["10.44.0.9/32"], "routes": ["10.43.0.0/16", "10.44.0.0/16"],
        "resolv_conf": None,
    }))
    assert code == 0, stderr
    seen = json.loads(stdout)
    assert sorted(r["dst"] for r in seen["routes4"]) == ["10.43.0.0/16", "10.44.0.0/16"]
    assert not any(r["dst"] == "default" for r in seen["routes6"])
    with open("/etc/resolv.conf") as f:
        assert seen["resolv_conf"] == f.read(), "no nameservers: the host's file stays"


SEND_UDP = r'''
import socket
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.sendto(b"through the tunnel", ("10.99.1.2", 4242))
'''


def test_what_the_application_sends_comes_out_of_the_tun_descriptor(runner):
    capture = os.path.join(runner.scratch, "packet")
    code, _, stderr = runner.run(driver_spec({"command": [runner.python, "-c", SEND_UDP],
                                              "capture": capture}))
    assert code == 0, stderr
    with open(capture) as f:
        packet = bytes.fromhex(f.read())
    assert packet[0] >> 4 == 4 and packet[9] == socket.IPPROTO_UDP
    assert socket.inet_ntoa(packet[12:16]) == "10.77.0.2"
    assert socket.inet_ntoa(packet[16:20]) == "10.99.1.2"
    assert packet.endswith(b"through the tunnel")


@pytest.mark.parametrize("command, status, message", [
    (["sh", "-c", "exit 7"], 7, None),
    (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM, None),
    (["sinfonia-no-such-command"], 127, "sinfonia-no-such-command: command not found"),
    (["/nonexistent/program"], 127, "/nonexistent/program: no such file"),
    (["./data.txt"], 126, "./data.txt: cannot execute: Permission denied"),
    (["./garbage"], 126, "./garbage: cannot execute: Exec format error"),
])
def test_exit_status_is_the_applications(runner, command, status, message):
    for name, mode in (("data.txt", 0o644), ("garbage", 0o755)):
        path = os.path.join(runner.scratch, name)
        with open(path, "wb") as f:
            f.write(b"\x00\x01 not a program")
        os.chmod(path, mode)
        os.chown(path, runner.uid, runner.gid)
    code, _, stderr = runner.run(driver_spec({"command": command}))
    assert code == status, stderr
    if message:
        assert stderr.splitlines()[-1] == f"sinfonia-tier3: {message}"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_to_the_tool_reach_the_application(runner, signum):
    process = runner.start(
        driver_spec({"command": [runner.python, "-c", sessions.SIGNAL_TRAP]}))
    stdout, stderr = sessions.signal_when_ready(process, signum, timeout=20)
    assert stdout == f"got {int(signum)}\n", stderr
    assert process.returncode == 40 + signum


def test_a_killed_tool_leaves_nothing_behind(runner):
    # The application starts a grandchild of its own, which must die too.
    process = runner.start(
        driver_spec({"command": ["sh", "-c", "sleep 300 & echo started; wait"]}))
    try:
        holder = json.loads(process.stderr.readline())["holder"]
        assert process.stdout.readline() == "started\n"
        namespaces = sessions.namespaces_of(holder)
        pids = sessions.descendants(process.pid)
        assert len(pids) >= 4, "holder, init, shell and sleep"
        process.kill()
        process.wait()
        sessions.assert_nothing_left(pids, namespaces)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if runner.as_user:
        assert sessions.files_of_user(runner.uid) == []


@pytest.mark.parametrize("embedded", [False, True], ids=["python", "embedded"])
def test_the_holder_waits_for_init_as_a_minimal_interpreter(runner, embedded):
    """Once the network is set up, the holder execs a fresh `python -I -S` that
    only waits for init: neither pyroute2 nor the tool's heap stays for the
    session. Where sys.executable is not a Python (a program embedding it),
    the holder waits as it is. Either way the status comes through."""
    spec = {"command": ["sh", "-c", "echo started; read line; exit 9"]}
    if embedded:
        spec["executable"] = "/bin/false"
    process = runner.start(driver_spec(spec), stdin=subprocess.PIPE)
    try:
        holder = json.loads(process.stderr.readline())["holder"]
        assert process.stdout.readline() == "started\n"
        with open(f"/proc/{holder}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        _, stderr = process.communicate("go\n", timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if embedded:
        assert argv[1].endswith(b"driver.py"), argv  # still the forked driver
    else:
        assert argv[1:4] == [b"-I", b"-S", b"-c"], argv
        assert argv[4] == st3._INIT_WAITER.encode(), argv
    assert process.returncode == 9, stderr


def test_the_namespace_holds_only_descriptors_the_caller_passed_on(runner, driver_file):
    # The driver holds a private descriptor (close-on-exec, like the tool's
    # sockets and other sessions' TUN devices) and passes one on (inheritable).
    private = os.path.join(runner.scratch, "private")
    passed = os.path.join(runner.scratch, "passed")
    for path in (private, passed):
        open(path, "w").close()
        os.chown(path, runner.uid, runner.gid)
    wrapper = (
        "import os, runpy, sys\n"
        f"private = os.open({private!r}, os.O_RDONLY)\n"
        f"passed = os.open({passed!r}, os.O_RDONLY)\n"
        "os.set_inheritable(passed, True)\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    spec = {"command": ["sh", "-c", "echo started; exec sleep 300"],
            "addresses": ADDRESSES, "routes": ROUTES}
    argv = [runner.python, "-c", wrapper, driver_file, REPO, json.dumps(spec)]
    process = subprocess.Popen(runner.command(argv), cwd=runner.scratch, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        holder = json.loads(process.stderr.readline())["holder"]
        assert process.stdout.readline() == "started\n"
        namespace_processes = [holder, *sessions.descendants(holder)]
        held = set().union(*map(sessions.held_files, namespace_processes))
    finally:
        process.kill()
        process.wait()
    assert private not in held, "the tool's private descriptors stay with the tool"
    assert passed in held, "what the caller passed on reaches the application"


def test_the_last_words_of_a_side_that_closed_with_messages_unread_arrive():
    # As when the child fails after the interface message while the tool's
    # configuration is already on its way: the kernel reports ECONNRESET first.
    tool, child = st3._Channel.pair()
    try:
        tool.send({"addresses": []})
        child.send({"error": "cannot set MTU"})
        child.close()
        assert tool.receive(5) == ({"error": "cannot set MTU"}, [])
        assert tool.receive(5) == (None, [])
    finally:
        tool.close()


def test_an_error_inside_the_child_is_one_line(runner):
    code, _, stderr = runner.run(driver_spec({"command": ["true"], "mtu": 60}))
    assert code == 125
    assert stderr == "sinfonia-tier3: cannot set MTU 60 on sinfonia0: Invalid argument\n"


# Terminal and job control ####################################################

TERMINAL_CHECK = r'''
import os, sys
print("foreground" if os.tcgetpgrp(0) == os.getpgrp() else "background", flush=True)
sys.stdin.readline()
'''


def test_the_application_gets_the_terminal_and_ctrl_c(runner):
    status, shown = sessions.run_in_terminal(
        runner.argv(driver_spec({"command": [runner.python, "-c", TERMINAL_CHECK]})),
        [("foreground", "\x03")],
    )
    assert "foreground" in shown
    assert status == 128 + signal.SIGINT, shown


SUSPENDABLE = r'''
import os, sys
for _ in range(2):
    print("foreground" if os.tcgetpgrp(0) == os.getpgrp() else "background", flush=True)
    sys.stdin.readline()
'''


def test_ctrl_z_stops_the_tool_too_and_continuing_it_continues_the_application(runner):
    def continue_like_a_shell(pid):
        # The tool stopped itself with the application; a shell's `fg` would
        # now send SIGCONT (the tool is its terminal's foreground job again).
        sessions.wait_until_stopped(pid)
        os.kill(pid, signal.SIGCONT)

    status, shown = sessions.run_in_terminal(
        runner.argv(driver_spec({"command": [runner.python, "-c", SUSPENDABLE]})),
        [("foreground", "\x1a"), ("", continue_like_a_shell), ("", "first line\n"),
         ("foreground", "second line\n")],
    )
    assert status == 0, shown
    assert shown.count("foreground") == 2, shown


# Failures that must be clear #################################################


@needs_root
def test_missing_tun_device_says_what_to_do(driver_file):
    # A private mount namespace whose /dev/net is empty: no device node.
    require_programs("unshare", "mount")
    spec = json.dumps({"command": ["true"], "addresses": ADDRESSES, "routes": ROUTES})
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         'mount -t tmpfs none /dev/net && exec "$@"', "-",
         sys.executable, driver_file, REPO, spec],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 125
    assert result.stderr == (
        "sinfonia-tier3: cannot open /dev/net/tun: No such file or directory: "
        "load the tun kernel module (`sudo modprobe tun`)\n")


@needs_root
def test_unopenable_tun_device_says_what_to_do(driver_file):
    # A private mount namespace with a /dev/net/tun of mode 0600, as some
    # distributions ship it; the test user cannot open it.
    require_programs("unshare", "mount")
    spec = json.dumps({"command": ["true"], "addresses": ADDRESSES, "routes": ROUTES})
    python = sessions.user_python()
    script = ("mount -t tmpfs none /dev/net && mknod -m 0600 /dev/net/tun c 10 200"
              ' && exec "$@"')
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "-",
         *sessions.as_user([python, driver_file, REPO, spec])],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 125
    assert result.stderr == (
        "sinfonia-tier3: cannot open /dev/net/tun: Permission denied: let your user "
        "open it (`sudo chmod 0666 /dev/net/tun`, as most distributions ship it), "
        "or run as root\n")


LIMIT_USER_NAMESPACES = r'''
import ctypes, os, sys
uid, gid = os.getuid(), os.getgid()
if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:
    sys.exit("unshare failed")
for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
    with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
with open("/proc/sys/user/max_user_namespaces", "w") as f:
    f.write("0")
os.execv(sys.argv[1], sys.argv[1:])
'''


@needs_root
def test_user_namespaces_switched_off_says_what_to_do(driver_file):
    # user.max_user_namespaces=0, for real: inside a user namespace of our
    # own (the limit is per namespace), so the rest of the machine keeps it.
    spec = json.dumps({"command": ["true"], "addresses": ADDRESSES, "routes": ROUTES})
    python = sessions.user_python()
    with sessions.tun_open_to_all():
        result = subprocess.run(
            sessions.as_user([python, "-c", LIMIT_USER_NAMESPACES,
                                  python, driver_file, REPO, spec]),
            capture_output=True, text=True, timeout=30, check=False,
        )
    assert result.returncode == 125
    assert result.stderr == (
        "sinfonia-tier3: user namespaces are disabled (user.max_user_namespaces=0): "
        "allow them with `sudo sysctl -w user.max_user_namespaces=15000`, "
        "or run as root\n")


@pytest.mark.parametrize("sysctl, value, expected", [
    # These two switches do not exist on this machine's kernel (Debian's
    # patch, Ubuntu's AppArmor), so a directory stands in for /proc/sys.
    ("kernel/unprivileged_userns_clone", "0",
     ("unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0): "
     "enable them with `sudo sysctl -w kernel.unprivileged_userns_clone=1`, or run as root")),
    ("kernel/apparmor_restrict_unprivileged_userns", "1",
     ("AppArmor restricts unprivileged user namespaces "
     "(kernel.apparmor_restrict_unprivileged_userns=1, as on Ubuntu 24.04): allow them "
     "with an AppArmor profile for this Python, or `sudo sysctl -w "
     "kernel.apparmor_restrict_unprivileged_userns=0`, or run as root")),
    ("user/max_user_namespaces", "15000",
     ("cannot create the application's user namespace: Operation not permitted: allow "
     "unprivileged user namespaces here (containers often forbid them), or run as root")),
])
def test_each_way_of_forbidding_user_namespaces_is_named(tmp_path, sysctl, value, expected):
    os.makedirs(tmp_path / os.path.dirname(sysctl))
    (tmp_path / sysctl).write_text(value + "\n")
    error = OSError(errno.EPERM, os.strerror(errno.EPERM))
    assert st3._explain_userns_failure(error, proc_sys=str(tmp_path)) == expected


# resolv.conf placement #######################################################


def _place_in_private_mounts(root, text):
    """In a forked child with its own mount namespace: place the file, then
    report what the resolver would read and what stays hidden."""
    st3._unshare(st3._CLONE_NEWNS)
    st3._mount(None, "/", None, st3._MS_REC | st3._MS_PRIVATE)
    resolved = os.path.join(root, "run/systemd/resolve")
    st3._place_resolv_conf(text, path=os.path.join(root, "etc/resolv.conf"),
                           hidden_dirs=[resolved], staging=os.path.join(root, "stage"))
    with open(os.path.join(root, "etc/resolv.conf")) as f:
        return f.read(), sorted(os.listdir(resolved)), sorted(os.listdir(os.path.join(root, "stage")))


@needs_root
def test_a_missing_resolv_conf_is_a_clear_failure_not_a_tmpfs_over_etc(tmp_path):
    root = str(tmp_path)
    for directory in ("etc", "run/systemd/resolve", "stage"):
        os.makedirs(os.path.join(root, directory))
    with pytest.raises(RuntimeError, match="TunnelError: .*/etc/resolv.conf is missing or "
                       "leads nowhere .*: create it"):
        Child(None, _place_in_private_mounts, (root, RESOLV_CONF)).result(20)


@needs_root
@pytest.mark.parametrize("layout", ["regular file", "systemd-resolved symlink",
                                    "symlink to an existing file"])
def test_resolv_conf_is_placed_whatever_etc_resolv_conf_is(tmp_path, layout):
    root = str(tmp_path)
    for directory in ("etc", "run/systemd/resolve", "stage"):
        os.makedirs(os.path.join(root, directory))
    resolved = os.path.join(root, "run/systemd/resolve")
    with open(os.path.join(resolved, "io.systemd.Resolve"), "w") as f:
        f.write("stands in for resolved's socket")
    host_text = "nameserver 192.0.2.53\n"
    etc_resolv = os.path.join(root, "etc/resolv.conf")
    if layout == "regular file":
        with open(etc_resolv, "w") as f:
            f.write(host_text)
    elif layout == "systemd-resolved symlink":  # its target is in the hidden directory
        with open(os.path.join(resolved, "stub-resolv.conf"), "w") as f:
            f.write(host_text)
        os.symlink("../run/systemd/resolve/stub-resolv.conf", etc_resolv)
    else:
        with open(os.path.join(root, "run/resolv.conf"), "w") as f:
            f.write(host_text)
        os.symlink("../run/resolv.conf", etc_resolv)
    text, hidden, staged = Child(None, _place_in_private_mounts, (root, RESOLV_CONF)).result(20)
    assert text == RESOLV_CONF
    assert "io.systemd.Resolve" not in hidden, "resolved's socket is out of reach"
    assert staged == [], "the staging mount is gone"
    with open(etc_resolv) as f:
        assert f.read() == host_text, "outside the namespace nothing changed"


# The interface moved in from outside (how the kernel backend uses the child) #


@needs_root
def test_a_link_moved_in_from_outside_is_configured(driver_file):
    with Namespace("st3rn") as outside, Namespace("st3rp") as peer:
        inner, _ = veth_pair(outside, peer)
        spec = json.dumps({
            "command": ["ip", "-j", "addr", "show", "dev", inner],
            "moved_link": {"name": inner,
                           "move": f"ip -n {outside.name} link set {inner} netns PID"},
            "addresses": ["10.78.0.2/24"], "routes": ["10.79.0.0/16"],
        })
        result = subprocess.run([sys.executable, driver_file, REPO, spec],
                                capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    link = json.loads(result.stdout)[0]
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]
            if a["family"] == "inet"] == [("10.78.0.2", 24)]
