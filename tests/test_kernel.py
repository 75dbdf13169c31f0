"""Kernel WireGuard backend and the sudo root helper, tested against a real
WireGuard kernel.

This machine's kernel has no WireGuard, so `pytest -m kernel` here boots a
guest with Debian's kernel (tests/vm/run.py) and runs this same file inside
it, where the tests below find a kernel with WireGuard and run as root. The
guest's root filesystem is the host's, read-only with a RAM overlay, so the
tests that add a user and a sudoers rule change only the guest.
"""

import base64
import functools
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sessions
from checkout import REPO
from netns import generate_keypair, missing_programs, require_programs

import sinfonia_tier3 as st3

pytestmark = pytest.mark.kernel

MODULE_FILE = REPO / "sinfonia_tier3.py"
IN_GUEST = bool(os.environ.get("SINFONIA_TIER3_IN_VM"))
#: An unprivileged uid for processes the helper is asked about; it needs no
#: passwd entry (only the sudo test, in the guest, adds a real user).
CALLER_UID = 4242
OTHER_UID = 4243
PYROUTE2_DEBIAN = "0.7.2"


def _load_vm_runner():
    spec = importlib.util.spec_from_file_location("vm_run", REPO / "tests/vm/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vm = _load_vm_runner()
# Read before the per-test $XDG_CACHE_HOME (conftest.py) is in place: the
# kernel download is cached across runs.
VM_CACHE = vm.cache_dir()
PYROUTE2_DEBIAN_DIR = VM_CACHE / f"pyroute2-{PYROUTE2_DEBIAN}"


@functools.cache
def _kernel_wireguard_missing():
    """Why kernel WireGuard links cannot be made here, or None if they can.
    It makes a link to find out: called when a test runs, never at collection."""
    if os.geteuid() != 0:
        return "not root"
    if missing_programs("ip"):
        return missing_programs("ip")
    name = f"wgprobe{uuid.uuid4().hex[:6]}"
    result = subprocess.run(["ip", "link", "add", name, "type", "wireguard"],
                            capture_output=True, text=True, check=False)
    if result.returncode:
        return f"ip link add type wireguard: {result.stderr.strip()}"
    subprocess.run(["ip", "link", "del", name], check=True)
    return None


@pytest.fixture(scope="session")
def kernel_wireguard():
    """Skips the test where kernel WireGuard links cannot be made. Session-wide,
    so that it comes before the module fixtures the test uses."""
    missing = _kernel_wireguard_missing()
    if missing is not None:
        pytest.skip(f"kernel WireGuard unavailable here ({missing}); "
                    "test_tests_pass_inside_guest runs these in a VM")


needs_kernel_wg = pytest.mark.usefixtures("kernel_wireguard")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the root helper needs root")
#: Pure input validation: it runs on the host; the (slow, emulated) guest skips it.
host_side = pytest.mark.skipif(IN_GUEST, reason="validation only; runs on the host")
in_guest_only = pytest.mark.skipif(
    not IN_GUEST, reason="adds a user and a sudoers rule: only inside the test VM")


# The guest, booted from the host ##############################################


def _ensure_pyroute2_debian():
    """pyroute2 as Debian 12 ships it, in the cache, for the guest to use too."""
    if (PYROUTE2_DEBIAN_DIR / "pyroute2").is_dir():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(PYROUTE2_DEBIAN_DIR), f"pyroute2=={PYROUTE2_DEBIAN}"],
                   check=True, timeout=300)


@pytest.mark.skipif(os.geteuid() != 0,
                    reason="the kernel test VM needs root: the tests in it run as root, "
                           "and qemu shows it the host's files with qemu's own rights")
def test_tests_pass_inside_guest():
    # This order: inside the guest, this test skips with the reason the run below allows.
    if _kernel_wireguard_missing() is None:
        pytest.skip("this kernel has WireGuard: the tests run here directly")
    if IN_GUEST:
        pytest.skip("already inside the test VM")
    why_not = vm.qemu_available()
    if why_not:
        pytest.fail(f"cannot boot the kernel test VM: {why_not}", pytrace=False)
    _ensure_pyroute2_debian()
    result = subprocess.run(
        [sys.executable, str(REPO / "tests/vm/run.py"), "--",
         sys.executable, "-m", "pytest", "-m", "kernel", "-p", "no:cacheprovider", "--color=no",
         "-q", "-rs", "--durations=5", str(REPO / "tests/test_kernel.py")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1800,
        env={**os.environ, "SINFONIA_TIER3_VM_CACHE": str(VM_CACHE)}, check=False)
    output = result.stdout.decode("utf-8", "replace")
    print(output)
    assert result.returncode == 0, f"tests inside the guest failed:\n{output[-6000:]}"
    assert " passed" in output, output
    # Inside, only the host-side validation tests and this one may skip.
    unexpected = [line for line in output.splitlines() if line.startswith("SKIPPED")
                  and "runs on the host" not in line and "tests run here directly" not in line]
    assert not unexpected, "\n".join(unexpected)


# The root helper ###############################################################


def _spec(**overrides):
    settings = {"endpoint": ("192.0.2.1", 51820), "listen_port": 0,
                "allowed_ips": ["10.7.0.0/16", "fd07::/64"], "persistent_keepalive": 25,
                **overrides}
    return st3._kernel_link_spec(generate_keypair()[0], generate_keypair()[1], **settings)


def _b64(key):
    return base64.b64encode(key).decode()


class _NetnsHolder:
    """A process as `uid`, in a new user+network namespace when `own_netns`."""

    def __init__(self, uid, *, new_namespaces=True, root_netns=False):
        require_programs("unshare", "setpriv")
        if root_netns:       # network namespace made by root, then drop to uid
            argv = ["unshare", "-n", "setpriv", f"--reuid={uid}", f"--regid={uid}",
                    "--clear-groups"]
            user = None
        else:
            argv = ["unshare", "-r", "-n"] if new_namespaces else []
            user = uid
        self.process = subprocess.Popen(
            [*argv, "sh", "-c", "echo ready; exec sleep 120"],
            user=user, group=user, extra_groups=[] if user else None,
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline() == "ready\n"
        self.pid = self.process.pid

    def run(self, *argv):
        """Run `argv` as root in this process's network namespace."""
        require_programs("nsenter", argv[0])
        return subprocess.run(["nsenter", "-t", str(self.pid), "-n", *argv],
                              capture_output=True, text=True, check=False)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def holders():
    started = []

    def start(uid=CALLER_UID, **options):
        holder = _NetnsHolder(uid, **options)
        started.append(holder)
        return holder

    yield start
    for holder in started:
        holder.stop()


def _run_helper(args, request, *, sudo_uid=CALLER_UID, pythonpath=None):
    env = {"PATH": os.environ["PATH"], "SUDO_UID": str(sudo_uid)}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, str(MODULE_FILE), "--root-helper", *args],
                          input=request, capture_output=True, env=env, timeout=60,
                          check=False)


def _link_exists(name):
    require_programs("ip")
    return subprocess.run(["ip", "link", "show", name], capture_output=True,
                          check=False).returncode == 0


def _udp_ports():
    require_programs("ss")
    out = subprocess.run(["ss", "-Hnlu"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[3].rsplit(":", 1)[1] for line in out.splitlines()}


def _pyroute2_variants():
    return [pytest.param(None, id="pyroute2-installed"),
            pytest.param(PYROUTE2_DEBIAN_DIR, id=f"pyroute2-{PYROUTE2_DEBIAN}",
                         marks=pytest.mark.skipif(
                             not (PYROUTE2_DEBIAN_DIR / "pyroute2").is_dir(),
                             reason=f"pyroute2 {PYROUTE2_DEBIAN} not in {PYROUTE2_DEBIAN_DIR}"
                                    " (test_tests_pass_inside_guest installs it)"))]


@needs_kernel_wg
@pytest.mark.parametrize("pythonpath", _pyroute2_variants())
def test_helper_creates_configures_and_moves_link(holders, pythonpath):
    holder = holders()
    ifname = f"wgt{uuid.uuid4().hex[:8]}"
    spec = _spec(listen_port=0)
    result = _run_helper([str(holder.pid), ifname], st3._encode_kernel_link_request(spec),
                         pythonpath=pythonpath)
    assert result.returncode == 0, result.stderr
    if pythonpath:   # the helper really ran with that pyroute2
        probe = subprocess.run([sys.executable, "-c", "import pyroute2; print(pyroute2.__file__)"],
                               env={"PYTHONPATH": str(pythonpath)}, capture_output=True,
                               text=True, check=True)
        assert probe.stdout.startswith(str(pythonpath))
    assert not _link_exists(ifname), "the link must leave the helper's namespace"
    dump = holder.run("wg", "show", ifname, "dump")
    assert dump.returncode == 0, dump.stderr
    device, peer = [line.split("\t") for line in dump.stdout.splitlines()]
    assert device[0] == _b64(spec.private_key)
    # Up (as the holder brings it), it opens its UDP socket: in the
    # namespace where it was created, not in the holder's.
    assert holder.run("ip", "link", "set", ifname, "up").returncode == 0
    listen_port = holder.run("wg", "show", ifname, "listen-port").stdout.strip()
    assert listen_port.isdigit() and listen_port != "0"
    assert peer[0] == _b64(spec.peer_public_key)
    assert peer[2] == "192.0.2.1:51820"
    assert sorted(peer[3].split(",")) == ["10.7.0.0/16", "fd07::/64"]
    assert peer[7] == "25"
    assert "wireguard" in holder.run("ip", "-d", "link", "show", ifname).stdout
    assert listen_port in _udp_ports(), "the UDP socket stays in the caller's namespace"
    holder.stop()
    assert listen_port not in _udp_ports(), "the link must go with the namespace"


@host_side
@needs_root
@pytest.mark.parametrize("request_bytes, complaint", [
    (b"", "not a JSON object"),
    (b"[]", "expected exactly the keys"),
    (b"\xff{}", "not a JSON object"),
    (b"x" * 20000, "more than"),
])
def test_helper_refuses_malformed_stream(request_bytes, complaint):
    result = _run_helper(["2", "wgok"], request_bytes)
    _assert_refused(result, complaint)


def _request_with(**changes):
    import json
    request = json.loads(st3._encode_kernel_link_request(_spec()))
    for key, value in changes.items():
        if value is KeyError:
            del request[key]
        else:
            request[key] = value
    return json.dumps(request).encode()


@host_side
@needs_root
@pytest.mark.parametrize("changes, complaint", [
    ({"extra": 1}, "expected exactly the keys"),
    ({"listen_port": KeyError}, "expected exactly the keys"),
    ({"private_key": _b64(bytes(31)) + "A"}, "44 characters"),
    ({"private_key": "*" * 43 + "="}, "not valid base64"),
    ({"private_key": _b64(bytes(32))}, "all zeros"),
    ({"peer_public_key": 5}, "44 characters"),
    ({"listen_port": 51820}, "listen_port must be 0"),
    ({"listen_port": 70000}, "listen_port must be 0"),
    ({"listen_port": "0"}, "listen_port must be 0"),
    ({"listen_port": False}, "listen_port must be 0"),
    ({"listen_port": 0.0}, "listen_port must be 0"),
    ({"persistent_keepalive": -1}, "persistent keepalive"),
    ({"persistent_keepalive": 2.5}, "persistent keepalive"),
    ({"endpoint": ["cloudlet.example", 51820]}, "literal"),
    ({"endpoint": ["0.0.0.0", 51820]}, "cannot be a peer"),
    ({"endpoint": ["fe80::1%eth0", 51820]}, "literal"),
    ({"allowed_ips": ["fe80::1%eth0"]}, "CIDR"),
    ({"endpoint": ["192.0.2.1", 0]}, "endpoint port"),
    ({"endpoint": "192.0.2.1:51820"}, "endpoint must be"),
    ({"allowed_ips": ["10.0.0.1/8"]}, "CIDR"),
    ({"allowed_ips": ["10.0.0.0/33"]}, "CIDR"),
    ({"allowed_ips": "10.0.0.0/8"}, "list of strings"),
    ({"allowed_ips": ["10.0.0.0/8"] * 300}, "more than 256"),
])
def test_helper_refuses_malformed_configuration(changes, complaint):
    _assert_refused(_run_helper(["2", "wgok"], _request_with(**changes)), complaint)


@host_side
@needs_root
def test_helper_refuses_duplicate_keys():
    request = _request_with()[:-1] + b', "listen_port": 1}'
    _assert_refused(_run_helper(["2", "wgok"], request), "twice")


@host_side
@needs_root
@pytest.mark.parametrize("ifname", [
    "", "a" * 16, "../etc", "wg0;reboot", "wg 0", "Wg0", "0wg", "wg/0", "wg\u00e90", "-wg",
])
def test_helper_refuses_bad_interface_name(ifname):
    _assert_refused(_run_helper(["2", ifname], _request_with()), "invalid interface name")


@host_side
@needs_root
@pytest.mark.parametrize("args, complaint", [
    (["1"], "usage"),
    (["1", "wg0", "extra"], "usage"),
    (["-5", "wgok"], "invalid PID"),
    (["1", "wgok"], "invalid PID"),
    (["12a", "wgok"], "invalid PID"),
    (["\u0663\u0663", "wgok"], "invalid PID"),
    (["99999999", "wgok"], "invalid PID"),
])
def test_helper_refuses_bad_arguments(args, complaint):
    _assert_refused(_run_helper(args, _request_with()), complaint)


@host_side
@needs_root
def test_helper_refuses_missing_sudo_uid():
    result = subprocess.run([sys.executable, str(MODULE_FILE), "--root-helper", "2", "wgok"],
                            input=_request_with(), capture_output=True, check=False,
                            env={"PATH": os.environ["PATH"]})
    _assert_refused(result, "SUDO_UID")


@needs_root
@pytest.mark.parametrize("situation, complaint", [
    ("foreign", "does not belong to user"),
    ("own-netns", "own network namespace"),
    ("root-netns", "helper's user namespace"),
    ("exited", "no such process"),
])
def test_helper_refuses_process(holders, situation, complaint):
    if situation == "foreign":
        pid = holders(OTHER_UID).pid
    elif situation == "own-netns":
        pid = holders(new_namespaces=False).pid
    elif situation == "root-netns":
        pid = holders(root_netns=True).pid
    else:
        holder = holders()
        holder.stop()
        pid = holder.pid
    ifname = f"wgt{uuid.uuid4().hex[:8]}"
    _assert_refused(_run_helper([str(pid), ifname], _request_with()), complaint)
    assert not _link_exists(ifname)


def _assert_refused(result, complaint):
    stderr = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    assert result.returncode != 0
    assert len(stderr.splitlines()) == 1, stderr
    assert complaint in stderr, stderr


# The helper runs only root's code ###############################################

#: Imported by the helper once it reads its request; planted beside a copy of
#: the module (or on PYTHONPATH), it leaves a mark when root imports it.
PLANTED_JSON = """
import pathlib, sys
pathlib.Path(sys.argv[0]).with_name("imported-as-root").write_text("yes")
raise SystemExit("planted json imported")
"""


def _copy_module(directory):
    import shutil
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(MODULE_FILE, directory / "sinfonia_tier3.py"))


def _run_copy(python_argv, env=None):
    """Run the helper as `python_argv` names it, as root, for pid 2 (a kernel
    thread in the helper's own namespace, refused once the request is read)."""
    return subprocess.run(
        [*python_argv, "--root-helper", "2", "wgok"], input=_request_with(),
        env={"PATH": os.environ["PATH"], "SUDO_UID": "0", **(env or {})},
        capture_output=True, timeout=60, check=False)


@host_side
@needs_root
def test_helper_refuses_a_copy_the_caller_owns(tmp_path):
    copy = _copy_module(tmp_path / "caller")
    os.chown(copy, CALLER_UID, CALLER_UID)
    result = _run_copy([sys.executable, "-I", str(copy)])
    _assert_refused(result, f"{copy} is owned by uid {CALLER_UID}, not root")
    assert "/usr/local/lib" in result.stderr.decode()


@host_side
@needs_root
@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_helper_refuses_a_copy_in_a_directory_others_may_write(tmp_path, mode):
    copy = _copy_module(tmp_path / "open")
    os.chmod(copy.parent, mode)
    _assert_refused(_run_copy([sys.executable, "-I", str(copy)]),
                    f"{copy.parent} is writable by others than root")


@host_side
@needs_root
def test_helper_refuses_a_virtualenv_the_caller_owns(tmp_path):
    """A virtualenv in a user's home: its site-packages is on the import path
    whatever -I says, so the helper refuses it (and names it)."""
    copy = _copy_module(tmp_path / "root-owned")
    venv = tmp_path / "home" / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(["chown", "-R", f"{CALLER_UID}:{CALLER_UID}", str(tmp_path / "home")],
                   check=True)
    result = _run_copy([str(venv / "bin" / "python"), "-I", str(copy)])
    _assert_refused(result, f"{venv}/")
    assert "owned by uid 4242" in result.stderr.decode()


@host_side
@needs_root
def test_helper_accepts_a_root_owned_file_in_a_sticky_directory(tmp_path):
    """A sticky directory (as /tmp) above a root-owned file is fine: only root
    may rename or remove what root owns there. The helper goes on to judge
    the process."""
    copy = _copy_module(tmp_path / "sticky")
    os.chmod(copy.parent, 0o1777)
    _assert_refused(_run_copy([sys.executable, "-I", str(copy)]), "own network namespace")


@host_side
@needs_root
def test_a_module_planted_beside_the_file_or_on_pythonpath_is_never_imported(tmp_path):
    copy = _copy_module(tmp_path / "app")
    (copy.parent / "json.py").write_text(PLANTED_JSON)
    planted_path = tmp_path / "pythonpath"
    planted_path.mkdir()
    (planted_path / "json.py").write_text(PLANTED_JSON)
    mark = copy.parent / "imported-as-root"
    # The control: without -I the planted module is imported, so the test can fail.
    _run_copy([sys.executable, str(copy)])
    assert mark.read_text() == "yes"
    mark.unlink()
    # The tool's own command line, as sudo would run it (with sudo, too).
    spec = importlib.util.spec_from_file_location("planted_copy", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    command = module._root_helper_command(2, "wgok")
    require_programs("sudo")
    python_argv = command[command.index("--") + 1:command.index("--root-helper")]
    assert python_argv == [sys.executable, "-I", str(copy)]
    result = _run_copy(python_argv, env={"PYTHONPATH": str(planted_path),
                                         "PYTHONSTARTUP": str(planted_path / "json.py")})
    _assert_refused(result, "own network namespace")
    assert not mark.exists()
    sudo = subprocess.run(command, input=_request_with(), capture_output=True, timeout=60,
                          env={"PATH": os.environ["PATH"],
                               "PYTHONPATH": str(planted_path)}, check=False)
    if b"sudo" in sudo.stderr and b"sinfonia-tier3" not in sudo.stderr:
        pytest.fail(f"sudo as root did not run the helper: {sudo.stderr.decode()}")
    _assert_refused(sudo, "own network namespace")
    assert not mark.exists()


@host_side
@needs_root
@pytest.mark.parametrize("request_bytes", [
    b"[" * 16000, b'{"listen_port": ' + b"9" * 5000 + b"}", b'"\\ud800"', b"\x00",
    b'{"endpoint": 1e999}',
])
def test_helper_answers_any_request_with_one_line(request_bytes):
    result = _run_helper(["2", "wgok"], request_bytes)
    assert b"Traceback" not in result.stderr
    _assert_refused(result, "invalid kernel WireGuard configuration")


# The sudo path, as an unprivileged user ########################################

SUDO_USER = "st3-vm-caller"
CALLER_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import sinfonia_tier3 as st3
spec = st3._parse_kernel_link_request(sys.stdin.buffer.read())
try:
    st3._provide_kernel_link(int(sys.argv[2]), sys.argv[3], spec, use_sudo=True)
except st3.SinfoniaError as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_status)
"""


@pytest.fixture(scope="module")
def python_for_users():
    """This Python, usable by other users: in the guest, /root (where pyenv
    may keep it) is opened up; on the host, a Python others cannot run skips."""
    if IN_GUEST:
        os.chmod("/root", 0o711)
    for directory in Path(sys.executable).parents:
        if not os.stat(directory).st_mode & 0o001:
            pytest.skip(f"{sys.executable} is not usable by other users ({directory})")


@pytest.fixture(scope="module")
def sudo_user(python_for_users):
    """A user who may run the root helper through sudo without a password,
    and one who may not (guest only: this changes /etc)."""
    import pwd
    require_programs("useradd", "sudo")
    for name in (SUDO_USER, SUDO_USER + "-x"):
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name],
                       check=True)
    rule = (f"{SUDO_USER} ALL=(root) NOPASSWD: {sys.executable} -I {MODULE_FILE} "
            "--root-helper *\n")
    Path("/etc/sudoers.d/sinfonia-tier3-test").write_text(rule)
    os.chmod("/etc/sudoers.d/sinfonia-tier3-test", 0o440)
    return pwd.getpwnam(SUDO_USER).pw_uid, pwd.getpwnam(SUDO_USER + "-x").pw_uid


def _call_through_sudo(uid, pid, ifname, spec):
    return subprocess.run(
        [sys.executable, "-c", CALLER_SCRIPT, str(REPO), str(pid), ifname],
        input=st3._encode_kernel_link_request(spec), capture_output=True, user=uid,
        group=uid, extra_groups=[], env={"PATH": os.environ["PATH"], "HOME": "/"},
        stdin=None, timeout=120, check=False)


@in_guest_only
@needs_kernel_wg
def test_sudo_helper_end_to_end(sudo_user, holders):
    uid, _ = sudo_user
    holder = holders(uid)
    ifname = f"wgs{uuid.uuid4().hex[:8]}"
    spec = _spec()
    result = _call_through_sudo(uid, holder.pid, ifname, spec)
    assert result.returncode == 0, result.stderr
    dump = holder.run("wg", "show", ifname, "dump")
    assert dump.stdout.split("\t")[0] == _b64(spec.private_key), dump.stderr
    assert not _link_exists(ifname)


@in_guest_only
@needs_kernel_wg
def test_sudo_without_rule_fails_with_one_line(sudo_user, holders):
    _, uid_without_rule = sudo_user
    holder = holders(uid_without_rule)
    result = _call_through_sudo(uid_without_rule, holder.pid, "wgnorule", _spec())
    assert result.returncode == 125
    stderr = result.stderr.decode()
    assert stderr.startswith("the sudo root helper failed: sudo: "), stderr
    assert len(stderr.splitlines()) == 1, stderr


@in_guest_only
@needs_kernel_wg
def test_sudo_helper_refuses_someone_elses_process(sudo_user, holders):
    uid, other_uid = sudo_user
    holder = holders(other_uid)
    result = _call_through_sudo(uid, holder.pid, "wgforeign", _spec())
    assert result.returncode == 125
    assert "does not belong to user" in result.stderr.decode()
    assert holder.run("ip", "link", "show", "wgforeign").returncode != 0


# Userspace datapath against kernel WireGuard ####################################

BULK = 50 << 20   # the 50 MiB each way
KERNEL_V4, OURS_V4 = "10.98.0.2", "10.98.0.1"


class _KernelPeer:
    """A kernel WireGuard link made by the kernel backend's own
    `_create_kernel_link` and moved into `namespace`; its UDP socket stays on
    this namespace's loopback, next to the userspace datapath's."""

    def __init__(self, namespace, private_key, peer_public_key, **settings):
        self.name = f"st3k{uuid.uuid4().hex[:8]}"
        self.namespace = namespace
        spec = st3._kernel_link_spec(private_key, peer_public_key, **settings)
        require_programs("wg")
        netns_fd = os.open(namespace.path, os.O_RDONLY)
        try:
            st3._create_kernel_link(self.name, spec, netns_fd)
        finally:
            os.close(netns_fd)
        namespace.add_addresses(self.name, [f"{KERNEL_V4}/24"])
        self.listen_port = int(namespace.run(["wg", "show", self.name, "listen-port"]))

    def latest_handshake(self):
        out = self.namespace.run(["wg", "show", self.name, "latest-handshakes"])
        return int(out.split()[1])


def _kernel_interop(kernel_initiates):
    import ipaddress

    from netns import Namespace, OurDatapath, exchange

    if not hasattr(st3, "Datapath"):
        pytest.fail("sinfonia_tier3.Datapath does not exist yet")
    (our_private, our_public), (kernel_private, kernel_public) = (
        generate_keypair(), generate_keypair())
    with Namespace("st3o") as ours_ns, Namespace("st3k") as kernel_ns:
        kernel = None
        if not kernel_initiates:
            kernel = _KernelPeer(kernel_ns, kernel_private, our_public,
                                 allowed_ips=[f"{OURS_V4}/32"])
        with OurDatapath(
                ours_ns, [f"{OURS_V4}/24"], our_private, kernel_public,
                endpoint=None if kernel_initiates else ("127.0.0.1", kernel.listen_port),
                allowed_ips=[ipaddress.ip_network(f"{KERNEL_V4}/32")]) as ours:
            if kernel_initiates:
                kernel = _KernelPeer(kernel_ns, kernel_private, our_public,
                                     endpoint=ours.endpoint, persistent_keepalive=1,
                                     allowed_ips=[f"{OURS_V4}/32"])
            ours.start()
            ours.datapath.wait_for_handshake(30)
            assert kernel.latest_handshake() > 0
            if kernel_initiates:
                exchange(ours_ns, OURS_V4, kernel_ns, BULK, timeout=600)
            else:
                exchange(kernel_ns, KERNEL_V4, ours_ns, BULK, timeout=600)
            stats = ours.datapath.stats()
            assert stats["rx_bytes"] >= BULK and stats["tx_bytes"] >= BULK


@needs_kernel_wg
@pytest.mark.parametrize("kernel_initiates", [False, True],
                         ids=["kernel-responds", "kernel-initiates"])
def test_userspace_datapath_with_kernel_wireguard(kernel_initiates):
    _kernel_interop(kernel_initiates)


# The kernel backend end to end, as root ##########################################

KERNEL_SESSION = """
import os, sys
sys.path.insert(0, sys.argv[1])
import sinfonia_tier3 as st3
url, command = sys.argv[2], sys.argv[3:]
wait_for = [st3._host_port(target) for target in os.environ.get("WAIT_FOR", "").split()]
uuid = st3._application_uuid("helloworld")
keypair = st3._load_or_create_keypair(uuid)
deployment = st3._deploy_verbosely(url, uuid, keypair, results=1, timeout=10,
                                   debug=False)[0].deployment
try:
    with st3._KernelTunnel() as tunnel:
        tunnel.connect(deployment.tunnel_config, keypair, debug=True)
        tunnel.wait_for(wait_for, 2)
        status = tunnel.run(command, st3._application_environment(deployment, url))
except st3.SinfoniaError as e:
    print(f"sinfonia-tier3: {e}", file=sys.stderr)
    status = e.exit_status
sys.exit(status)
"""


@pytest.fixture(scope="module")
def cloudlet_url():
    import cloudlet
    with cloudlet.WireGuardServer("sinfonia") as server, \
            cloudlet.Cloudlet(wireguard=server) as api:
        yield api.url


def _kernel_session(url, *command, tmp_path, pythonpath=None, wait_for=""):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "WAIT_FOR": wait_for}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    require_programs(command[0])
    return subprocess.run(
        [sys.executable, "-c", KERNEL_SESSION, str(REPO), url, *command],
        env=env, capture_output=True, text=True, timeout=120, check=False)


def _st3_links():
    require_programs("ip")
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split(":")[1].strip() for line in out.splitlines()
            if line.split(":")[1].strip().startswith("st3")]


@needs_kernel_wg
@pytest.mark.parametrize("pythonpath", _pyroute2_variants())
def test_kernel_backend_gets_the_page_as_root(cloudlet_url, tmp_path, pythonpath):
    ports_before, links_before = _udp_ports(), _st3_links()
    result = _kernel_session(cloudlet_url, "curl", "-sS", "--max-time", "20",
                             "http://helloworld/", tmp_path=tmp_path, pythonpath=pythonpath)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello from the sinfonia test cloudlet!"), result
    assert "kernel WireGuard link st3" in result.stderr
    assert _st3_links() == links_before
    endpoint_port = re.search(r"tunnel endpoint 127\.0\.0\.1:(\d+)", result.stderr)[1]
    # The kernel frees a network namespace, and the link in it, asynchronously.
    deadline = time.monotonic() + 10
    while _udp_ports() - ports_before - {endpoint_port} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _udp_ports() - ports_before - {endpoint_port}, "the UDP socket must go"


@needs_kernel_wg
def test_kernel_backend_passes_the_exit_status_through(cloudlet_url, tmp_path):
    result = _kernel_session(cloudlet_url, "sh", "-c", "exit 7", tmp_path=tmp_path)
    assert result.returncode == 7, result.stderr


@needs_kernel_wg
def test_kernel_backend_holds_the_application_until_the_backend_answers(cloudlet_url,
                                                                       tmp_path):
    ready = _kernel_session(cloudlet_url, "sh", "-c", "echo started", tmp_path=tmp_path,
                            wait_for="helloworld:80")
    assert (ready.returncode, ready.stdout) == (0, "started\n"), ready.stderr
    marker = tmp_path / "started"
    never = _kernel_session(cloudlet_url, "touch", str(marker), tmp_path=tmp_path,
                            wait_for="helloworld:80 helloworld:9097")
    assert never.returncode == 125
    assert never.stderr.splitlines()[-1].startswith(
        "sinfonia-tier3: the backend did not answer at helloworld:9097 within 2 s")
    assert not marker.exists()


@needs_kernel_wg
@pytest.mark.forward
def test_kernel_backend_carries_a_forward(cloudlet_url, tmp_path):
    import sessions

    require_programs("curl")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "sinfonia_tier3.py"), "--tunnel", "kernel", "-L",
         "0:helloworld:80", cloudlet_url, "helloworld"],
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        (local,), said = sessions.forwarding_addresses(process, 1, timeout=60)
        page = subprocess.run(["curl", "-sS", "--max-time", "20", f"http://{local}/"],
                              capture_output=True, text=True, timeout=60, check=False)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert page.stdout.startswith("Hello from the sinfonia test cloudlet!"), page.stderr
    assert process.returncode == 0, said


@in_guest_only
@needs_kernel_wg
def test_kernel_backend_through_sudo_as_a_user(sudo_user, cloudlet_url):
    import shutil
    import tempfile
    uid, _ = sudo_user
    home = Path(tempfile.mkdtemp(prefix="st3-vm-home-"))
    os.chown(home, uid, uid)
    try:
        result = _kernel_session_as(uid, home, cloudlet_url)
    finally:
        shutil.rmtree(home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello from the sinfonia test cloudlet!"), result
    assert "by the sudo root helper" in result.stderr
    assert _st3_links() == []


def _kernel_session_as(uid, home, cloudlet_url):
    require_programs("curl")
    return subprocess.run(
        [sys.executable, "-c", KERNEL_SESSION, str(REPO), cloudlet_url,
         "curl", "-sS", "--max-time", "20", "http://helloworld/"],
        env={"PATH": os.environ["PATH"], "HOME": str(home), "XDG_CACHE_HOME": str(home)},
        user=uid, group=uid, extra_groups=[], capture_output=True, text=True,
        timeout=120, check=False)


# Tunnel selection #################################################################

CHOOSE_AS_USER = """
import sys
sys.path.insert(0, sys.argv[1])
import sinfonia_tier3 as st3
print(st3._choose_tunnel("auto", debug=sys.argv[2:] == ["debug"]))
"""


@pytest.mark.parametrize("requested", ["userspace", "kernel"])
def test_explicit_tunnel_is_taken_as_is(requested):
    assert st3._choose_tunnel(requested) == requested


@needs_root
def test_auto_as_root_takes_kernel_exactly_when_the_kernel_has_wireguard(capsys):
    expected = "kernel" if _kernel_wireguard_missing() is None else "userspace"
    assert st3._choose_tunnel("auto", debug=True) == expected
    assert f"--tunnel auto: {expected} (" in capsys.readouterr().err


PROBE_WITH_STAND_INS = """
import sys
sys.path.insert(0, sys.argv[1])
import sinfonia_tier3 as st3
print(st3._why_no_kernel_wireguard(proc=sys.argv[2], sys_module=sys.argv[3]))
print("pyroute2" in sys.modules)
"""


@pytest.mark.parametrize("modules, builtin, known_at_once", [
    (False, False, True), (False, True, False), (True, False, False)])
def test_a_kernel_without_modules_or_built_in_wireguard_is_known_without_pyroute2(
        tmp_path, modules, builtin, known_at_once):
    # Stand-ins for /proc and /sys/module: this kernel cannot be given module
    # support or a built-in WireGuard. Where the answer is not known at once,
    # the real probe runs (it needs root to say yes or no).
    proc, sys_module = tmp_path / "proc", tmp_path / "module"
    proc.mkdir()
    sys_module.mkdir()
    if modules:
        (proc / "modules").write_text("")
    if builtin:
        (sys_module / "wireguard").mkdir()
    if not known_at_once and os.geteuid() != 0:
        pytest.skip("the real probe needs root")
    result = subprocess.run(
        [sys.executable, "-c", PROBE_WITH_STAND_INS, str(REPO), str(proc), str(sys_module)],
        capture_output=True, text=True, timeout=60, check=True)
    answer, pyroute2_loaded = result.stdout.splitlines()
    if known_at_once:
        assert answer == "the kernel has no WireGuard (none built in, and no module support)"
        assert pyroute2_loaded == "False"
    else:
        assert pyroute2_loaded == "True"


@needs_root
@pytest.mark.parametrize("debug", ["debug", "quiet"])
def test_auto_as_a_user_without_tun_access_takes_kernel_through_sudo(debug):
    mode = os.stat("/dev/net/tun").st_mode
    if mode & 0o006 == 0o006:
        pytest.skip("/dev/net/tun is open to every user here")
    # The system's Python: any user may run it, wherever this one lives.
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    result = subprocess.run([python, "-c", CHOOSE_AS_USER, str(REPO), debug],
                            user=CALLER_UID, group=CALLER_UID, extra_groups=[],
                            capture_output=True, text=True, check=True,
                            env={"PATH": os.environ["PATH"]})
    assert result.stdout == "kernel\n"
    # Said even without --debug, naming what failed: sudo may ask or refuse next.
    assert "/dev/net/tun" in result.stderr and "through sudo" in result.stderr


# The helper re-executes the very file that runs ###################################

HELPER_COMMAND = """
import sys, json
sys.path.insert(0, sys.argv[1])
module = __import__(sys.argv[2], fromlist=["_root_helper_command"])
print(json.dumps(module._root_helper_command(2, "wgok")))
"""


def _helper_command_from(path_entry, module_name):
    import json
    out = subprocess.run([sys.executable, "-c", HELPER_COMMAND, str(path_entry), module_name],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _assert_reexec_reaches_helper(command, program):
    assert command[:3] == ["sudo", "-n", "--"] and command[4:6] == ["-I", str(program)], \
        command
    # Run what sudo would run, minus sudo: the helper answers, so the entry
    # point works from there.
    result = subprocess.run(command[3:-1] + ["bad/name"], input=_request_with(),
                            env={"PATH": os.environ["PATH"], "SUDO_UID": str(CALLER_UID)},
                            capture_output=True, check=False)
    _assert_refused(result, "invalid interface name")


@needs_root
def test_helper_reexec_from_a_vendored_copy(tmp_path):
    import shutil
    vendor = tmp_path / "myapp" / "_vendor"
    vendor.mkdir(parents=True)
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    shutil.copy(MODULE_FILE, vendor / "sinfonia_tier3.py")
    command = _helper_command_from(tmp_path, "myapp._vendor.sinfonia_tier3")
    _assert_reexec_reaches_helper(command, vendor / "sinfonia_tier3.py")


@needs_root
def test_helper_reexec_from_a_zipapp(tmp_path):
    import shutil
    source = tmp_path / "app"
    source.mkdir()
    shutil.copy(MODULE_FILE, source / "sinfonia_tier3.py")
    # Not `zipapp -m sinfonia_tier3:main`: its __main__.py drops main()'s
    # return value, so every exit status would be 0.
    (source / "__main__.py").write_text(
        "import sys\nimport sinfonia_tier3\nsys.exit(sinfonia_tier3.main())\n")
    archive = tmp_path / "sinfonia-tier3.pyz"
    subprocess.run([sys.executable, "-m", "zipapp", str(source), "-o", str(archive)],
                   check=True)
    command = _helper_command_from(archive, "sinfonia_tier3")
    _assert_reexec_reaches_helper(command, archive)


@in_guest_only
@needs_kernel_wg
def test_kernel_backend_as_root_without_user_namespaces(cloudlet_url, tmp_path):
    limit = Path("/proc/sys/user/max_user_namespaces")
    saved = limit.read_text()
    limit.write_text("0")
    try:
        result = _kernel_session(cloudlet_url, "sh", "-c", "exit 3", tmp_path=tmp_path)
    finally:
        limit.write_text(saved)
    assert result.returncode == 3, result.stderr


@in_guest_only
def test_auto_as_a_user_without_user_namespaces_takes_kernel_through_sudo(
        python_for_users):
    limit = Path("/proc/sys/user/max_user_namespaces")
    saved = limit.read_text()
    limit.write_text("0")
    try:
        result = subprocess.run([sys.executable, "-c", CHOOSE_AS_USER, str(REPO)],
                                user=CALLER_UID, group=CALLER_UID, extra_groups=[],
                                capture_output=True, text=True, check=True,
                                env={"PATH": os.environ["PATH"]})
    finally:
        limit.write_text(saved)
    assert result.stdout == "kernel\n"
    assert "user namespaces are disabled" in result.stderr


@needs_root
def test_auto_turns_to_sudo_when_the_userspace_tunnel_fails_at_run_time(cloudlet):
    """A /dev/net/tun that every check passes but that is no TUN device (here
    /dev/null bound over it, in a mount namespace of the test's own): the
    userspace path fails in the holder, the tool says so, tries the
    kernel path through sudo, and that one's refusal (no sudoers rule for the
    test user) is its one last line."""
    import sessions

    if sessions.missing_root():
        pytest.skip(sessions.missing_root())
    require_programs("unshare", "mount", "sudo")
    python = sessions.user_python()
    with sessions.user_directory() as scratch:
        script = ('mount --bind /dev/null /dev/net/tun && exec "$@"')
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             *sessions.as_user([python, "-m", "sinfonia_tier3", cloudlet.url,
                                "helloworld", "true"])],
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO),
                 "XDG_CACHE_HOME": scratch, "HOME": scratch},
            cwd=scratch, capture_output=True, text=True, timeout=60, check=False)
    lines = result.stderr.splitlines()
    assert result.returncode == 125, result.stderr
    assert any(line.startswith("sinfonia-tier3: the userspace tunnel failed (")
               and "trying the kernel's WireGuard through sudo" in line
               for line in lines), result.stderr
    assert "sudo" in lines[-1] and "Traceback" not in result.stderr, result.stderr


# Sessions that last, on the kernel backend ######################################


class _SudoUserRunner(sessions.Runner):
    """sessions.Runner for `uid`, the user with the sudo rule (SUDO_USER)."""

    def __init__(self, uid, scratch):
        super().__init__([], False, scratch)
        self.uid = self.gid = uid

    def command(self, argv):
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                *argv]

    def env(self, cache="cache", **extra):
        return {"PATH": os.environ["PATH"], "HOME": self.scratch,
                "XDG_CACHE_HOME": os.path.join(self.scratch, cache), **extra}


def _kernel_recovery(runner):
    """A kernel-backend session that keeps asking while the cloudlet drops its
    deployment (a new address and port come back); the tool's stderr."""
    import cloudlet
    with cloudlet.WireGuardServer("sinfonia") as server, \
            cloudlet.Cloudlet(wireguard=server) as api:
        session = sessions.AskingSession(
            runner, ["--tunnel", "kernel", api.url, "helloworld"],
            settings={"_DATA_LOST_AFTER": 3.0, "_RETRY_FIRST": 2.0})
        try:
            session.after(api.expire_all)
        finally:
            stderr = session.end()
    assert "sinfonia-tier3: tunnel lost: no answer for " in stderr, stderr
    assert "address 10.44.0.3/32" in stderr, stderr
    assert "sinfonia-tier3: tunnel back after " in stderr, stderr


@pytest.mark.recovery
@needs_kernel_wg
def test_a_kernel_link_follows_a_dropped_deployment_as_root(tmp_path):
    _kernel_recovery(sessions.Runner([], False, str(tmp_path)))


@pytest.mark.recovery
@in_guest_only
@needs_kernel_wg
def test_a_kernel_link_follows_a_dropped_deployment_through_sudo(sudo_user):
    # The peer changes over the netlink socket opened inside the namespace:
    # the caller owns that namespace's user namespace, which is enough.
    import shutil
    import tempfile
    uid, _ = sudo_user
    scratch = tempfile.mkdtemp(prefix="st3-vm-home-")
    os.chown(scratch, uid, uid)
    try:
        _kernel_recovery(_SudoUserRunner(uid, scratch))
    finally:
        shutil.rmtree(scratch)
