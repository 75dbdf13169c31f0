#!/usr/bin/env python3
"""Run a command inside a small KVM guest booted from Debian's own kernel.

This machine's kernel has no WireGuard module, so the kernel backend, the sudo
root helper and userspace-to-kernel interop are tested inside a virtual
machine instead:

    python3 tests/vm/run.py [--timeout S] [--memory MB] -- COMMAND [ARGS...]

The guest boots Debian's `linux-image-amd64` kernel (downloaded with apt-get
and unpacked once into the cache, `$XDG_CACHE_HOME/sinfonia-tier3-vm`), an
initramfs built here on each run from `busybox-static` and the few modules the
guest needs, and sees this host's whole filesystem read-only over 9p, with a
RAM overlay on top so that the guest can write (its /etc, /tmp, __pycache__)
without touching the host. It has no network device: only its own loopback
and the namespaces the tests create. COMMAND runs as root in the current
directory with the host's PATH and SINFONIA_TIER3_IN_VM=1 (so that a pytest
inside does not boot a guest again); its output is the guest's serial console
and its exit status is this script's. Without a usable /dev/kvm the guest runs
under software emulation (qemu's TCG), which works but is several times
slower: the script says which it takes and why. A /dev/kvm that cannot boot
the guest (a KVM internal error or a hang, as with nested virtualization
through kvm_pvm, which runs only kernels built for it) is noticed within
KVM_BOOT_TIMEOUT seconds and remembered in the cache for this host kernel.

Exit status 125 means the guest could not be prepared or booted, 124 that it
ran out of time.
"""

import argparse
import gzip
import io
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
GUEST_ENV_VAR = "SINFONIA_TIER3_IN_VM"
BOOTED_MARKER = b"sinfonia-tier3 vm: up after"
#: A working KVM boots the guest in a few seconds; past this, it is not working.
KVM_BOOT_TIMEOUT = 30

#: What the guest loads before it runs anything; their dependencies come along.
GUEST_MODULES = (
    "virtio_pci", "9pnet_virtio", "9p", "overlay",   # the host's filesystem
    "wireguard", "tun", "veth", "dummy",               # what the tests use
)

#: The host environment the command sees inside (everything else is left out).
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV",
              "XDG_CACHE_HOME", "TERM", "SINFONIA_TIER3_VM_CACHE")

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
fail() { echo "sinfonia-tier3 vm: $*"; poweroff -f; }
for module in $(cat /modules.load); do
    insmod "/modules/$module" || fail "cannot load $module"
done
mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro \
    hostroot /host || fail "cannot mount the host filesystem"
mount -t tmpfs -o mode=0755 rw /rw
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work \
    overlay /newroot || fail "cannot mount the overlay root"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
ln -s /proc/self/fd /newroot/dev/fd
ln -s /proc/self/fd/0 /newroot/dev/stdin
ln -s /proc/self/fd/1 /newroot/dev/stdout
ln -s /proc/self/fd/2 /newroot/dev/stderr
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount -t tmpfs -o mode=0755 run /newroot/run
mkdir -p /newroot/run/vmio /newroot/run/netns /newroot/run/sudo
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 \
    vmio /newroot/run/vmio || fail "cannot mount the result directory"
hostname localhost
# Debian's kernel may default to no unprivileged user namespaces; the tests
# turn it off themselves where they want that.
echo 1 >/proc/sys/kernel/unprivileged_userns_clone 2>/dev/null
ip link set lo up
echo "sinfonia-tier3 vm: up after $(cut -d' ' -f1 /proc/uptime) s"
# switch_root rather than chroot: a chrooted process may not create user namespaces.
mkdir -p /newroot/run/vm
cp /bin/busybox /newroot/run/vm/busybox
cat >/newroot/run/vm/stage2 <<'EOF'
/bin/sh /run/vmio/command
echo $? >/run/vmio/status
/run/vm/busybox umount /run/vmio
/run/vm/busybox poweroff -f
EOF
exec switch_root /newroot /run/vm/busybox sh /run/vm/stage2
"""


class VMError(Exception):
    """The guest could not be prepared or booted; the message says why."""


def cache_dir():
    """Where kernels and busybox are kept between runs (never the repository)."""
    override = os.environ.get("SINFONIA_TIER3_VM_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "sinfonia-tier3-vm"


def _kernel_package_name():
    """The versioned kernel package the metapackage points at, or None offline."""
    try:
        out = subprocess.run(["apt-cache", "depends", KERNEL_METAPACKAGE],
                             check=False, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[1]
    return None


def _download_and_unpack(packages, dest):
    """apt-get download `packages` and unpack them into `dest` (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        tmp = Path(tmp)
        result = subprocess.run(["apt-get", "download", *packages], cwd=tmp,
                                check=False, capture_output=True, text=True, timeout=600)
        if result.returncode:
            raise VMError(f"apt-get download {' '.join(packages)} failed: "
                          f"{result.stderr.strip().splitlines()[-1:]}")
        tree = tmp / "tree"
        for deb in tmp.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        os.rename(tree, dest)


def _depmod():
    for candidate in (shutil.which("depmod"), "/usr/sbin/depmod", "/sbin/depmod"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise VMError("depmod not found (Debian package kmod)")


def prepare_kernel():
    """Return (vmlinuz, modules dir, busybox) from the cache, downloading once."""
    cache = cache_dir()
    package = _kernel_package_name()
    if package is None:
        cached = sorted(cache.glob("linux-image-*"))
        if not cached:
            raise VMError(f"cannot resolve {KERNEL_METAPACKAGE} with apt-cache "
                          "and no kernel is cached")
        package = cached[-1].name
    tree = cache / package
    if not tree.is_dir():
        _depmod()  # a fresh kernel needs it: say so before the download, not after
        print(f"sinfonia-tier3 vm: downloading {package} into {cache}",
              file=sys.stderr)
        _download_and_unpack([package], tree)
    busybox_tree = cache / BUSYBOX_PACKAGE
    if not busybox_tree.is_dir():
        _download_and_unpack([BUSYBOX_PACKAGE], busybox_tree)
    vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
    modules = sorted((tree / "lib" / "modules").iterdir())
    if not vmlinuz or not modules:
        raise VMError(f"{tree} holds no kernel; remove it and run again")
    release = modules[-1].name
    if not (modules[-1] / "modules.dep").exists():
        subprocess.run([_depmod(), "-b", str(tree), release], check=True)
    return vmlinuz[-1], modules[-1], busybox_tree / "bin" / "busybox"


def _module_load_order(modules_dir, names):
    """Relative .ko paths for `names` and their dependencies, dependencies first."""
    deps = {}
    by_name = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order = []

    def add(path):
        if path in order:
            return
        for dep in reversed(deps[path]):
            add(dep)
        order.append(path)

    builtin = (modules_dir / "modules.builtin").read_text()
    for name in names:
        if name in by_name:
            add(by_name[name])
        elif f"/{name}.ko" not in builtin:
            raise VMError(f"module {name} is neither in modules.dep nor built in")
    return order


class _Cpio:
    """Just enough of the cpio "newc" format for an initramfs."""

    def __init__(self):
        self.out = io.BytesIO()
        self.ino = 1

    def add(self, name, mode, data=b"", rdev=(0, 0)):
        name_bytes = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name_bytes), 0))
        self.ino += 1
        self.out.write(header.encode() + name_bytes)
        self.out.write(b"\0" * (-self.out.tell() % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def finish(self):
        self.add("TRAILER!!!", 0)
        return self.out.getvalue()


def build_initramfs(modules_dir, busybox, path):
    """Write the guest's initramfs (busybox, init, modules) to `path`."""
    archive = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "modules"):
        archive.add(directory, stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive.add("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes())
    archive.add("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode())
    load = []
    for relative in _module_load_order(modules_dir, GUEST_MODULES):
        flat = relative.replace("/", "_")
        archive.add(f"modules/{flat}", stat.S_IFREG | 0o644,
                    (modules_dir / relative).read_bytes())
        load.append(flat)
    archive.add("modules.load", stat.S_IFREG | 0o644, "\n".join(load).encode())
    path.write_bytes(gzip.compress(archive.finish(), compresslevel=1))


def _command_script(command, cwd):
    lines = ["set -e"]
    for name in PASSED_ENV:
        if name in os.environ:
            lines.append(f"export {name}={shlex.quote(os.environ[name])}")
    lines.append(f"export {GUEST_ENV_VAR}=1")
    lines.append(f"cd {shlex.quote(str(cwd))}")
    lines.append("set +e")
    lines.append("exec " + " ".join(shlex.quote(arg) for arg in command))
    return "\n".join(lines) + "\n"


def qemu_command(vmlinuz, initramfs, io_dir, *, memory_mb=2048, cpus=2, kvm=True):
    """The qemu command line, with KVM or with software emulation."""
    accel = ["-accel", "kvm", "-cpu", "host"] if kvm else ["-accel", "tcg", "-cpu", "max"]
    return [
        "qemu-system-x86_64", "-M", "q35", *accel,
        "-m", str(memory_mb), "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-nic", "none", "-serial", "stdio",
        "-kernel", str(vmlinuz), "-initrd", str(initramfs),
        "-append", "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init",
        # The whole host filesystem, read-only (qemu may run as root here).
        "-virtfs", ("local,path=/,mount_tag=hostroot,security_model=none,"
                    "readonly=on,multidevs=remap"),
        # A private temporary directory: the command in, the exit status out.
        "-virtfs", f"local,path={io_dir},mount_tag=vmio,security_model=none",
    ]


def qemu_available():
    """Why the guest cannot run here, or None when it can."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not found (Debian package qemu-system-x86)"
    if shutil.which("apt-get") is None and not any(cache_dir().glob("linux-image-*")):
        return "no cached guest kernel and no apt-get to download one"
    return None


def _kvm_unusable():
    """Why KVM will not run this guest here, or None if it is worth a try."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    if os.path.isdir("/sys/module/kvm_pvm"):
        # PVM (nested virtualization without hardware support) runs only
        # guest kernels built for it; Debian's is not.
        return "/dev/kvm is kvm_pvm, which cannot run Debian's kernel"
    if _kvm_verdict_file().exists():
        return f"KVM failed to boot the guest before ({_kvm_verdict_file()})"
    return None


def _kvm_verdict_file():
    return cache_dir() / f"kvm-broken-on-{os.uname().release}"


def _boot(argv, timeout, boot_timeout, stdout):
    """Run qemu, copying its console to `stdout`; "unbooted" if the guest never
    came up within `boot_timeout`, else "timeout" or "done"."""
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    booted = threading.Event()

    def forward():
        for line in qemu.stdout:
            if line.startswith(BOOTED_MARKER):
                booted.set()
            stdout.write(line)
            stdout.flush()

    forwarder = threading.Thread(target=forward, daemon=True)
    forwarder.start()
    try:
        if boot_timeout and not booted.wait(boot_timeout):
            return "unbooted"
        qemu.wait(timeout)
        return "done"
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        if qemu.poll() is None:
            os.killpg(qemu.pid, signal.SIGKILL)
        qemu.wait()
        forwarder.join(5)


def run(command, *, cwd=None, timeout=900, memory_mb=2048, accel="auto",
        stdout=None):
    """Boot the guest, run `command` there, return its exit status.

    With accel "auto", KVM is tried first; where /dev/kvm exists but cannot
    boot a Linux guest (some nested setups fail with a KVM internal error or
    hang), the guest boots again under software emulation and the verdict is
    remembered for this host kernel.
    """
    why_not = qemu_available()
    if why_not:
        raise VMError(why_not)
    stdout = stdout or sys.stdout.buffer
    vmlinuz, modules_dir, busybox = prepare_kernel()
    if accel == "auto":
        why_not_kvm = _kvm_unusable()
        if why_not_kvm:
            print(f"sinfonia-tier3 vm: software emulation: {why_not_kvm}", file=sys.stderr)
        accel = "tcg" if why_not_kvm else "kvm"
        fall_back = accel == "kvm"
    else:
        fall_back = False
    with tempfile.TemporaryDirectory(prefix="sinfonia-vm-") as io_dir:
        io_path = Path(io_dir)
        initramfs = io_path / "initramfs.gz"
        build_initramfs(modules_dir, busybox, initramfs)
        (io_path / "command").write_text(_command_script(command, cwd or os.getcwd()))
        while True:
            argv = qemu_command(vmlinuz, initramfs, io_path, memory_mb=memory_mb,
                                kvm=accel == "kvm")
            outcome = _boot(argv, timeout, KVM_BOOT_TIMEOUT if fall_back
                            else None, stdout)
            if outcome == "unbooted" or (fall_back and outcome == "done" and
                                         not (io_path / "status").exists()):
                print("sinfonia-tier3 vm: /dev/kvm cannot boot this guest here; "
                      "using software emulation from now on", file=sys.stderr)
                _kvm_verdict_file().write_text("KVM did not boot the guest\n")
                accel, fall_back = "tcg", False
                continue
            break
        if outcome == "timeout":
            print(f"sinfonia-tier3 vm: guest still running after {timeout} s, killed",
                  file=sys.stderr)
            return 124
        status_file = io_path / "status"
        if not status_file.exists():
            raise VMError("the guest stopped without an exit status; "
                          "its console output says why")
        return int(status_file.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Run a command inside a KVM guest with Debian's kernel.")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds before the guest is killed (default 900)")
    parser.add_argument("--memory", type=int, default=2048, metavar="MB")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                        help="KVM, software emulation (tcg), or KVM with a "
                             "fallback to tcg (auto, the default)")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    if os.environ.get(GUEST_ENV_VAR):
        print("sinfonia-tier3 vm: already inside the guest", file=sys.stderr)
        return 125
    started = time.monotonic()
    try:
        status = run(args.command, timeout=args.timeout, memory_mb=args.memory,
                     accel=args.accel)
    except (VMError, OSError, subprocess.CalledProcessError) as e:
        print(f"sinfonia-tier3 vm: {e}", file=sys.stderr)
        return 125
    sys.stdout.flush()
    print(f"sinfonia-tier3 vm: guest ran {time.monotonic() - started:.1f} s, "
          f"exit status {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
