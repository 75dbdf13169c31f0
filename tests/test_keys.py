"""The per-application key cache (DESIGN §3): upstream's format, atomic
writes, modes, and refusal of files that are not safely ours."""

import base64
import fcntl
import json
import multiprocessing
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest
from checkout import REPO

import sinfonia_tier3 as st3

UUID = "00000000-0000-0000-0000-000000000000"

# RFC 7748 §6.1: Alice's X25519 private key and the public key it yields.
RFC7748_PRIVATE = bytes.fromhex(
    "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
)
RFC7748_PUBLIC = bytes.fromhex(
    "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
)
# ... and Bob's public key, which does not belong to Alice's private key.
RFC7748_BOB_PUBLIC = bytes.fromhex(
    "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
)


def b64(key):
    return base64.b64encode(key).decode()


def write_key_file(path, content):
    """`content` (bytes) as a 0600 key file in a 0700 cache directory."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(0o600)


def write_upstream_file(path, private, public):
    """A key file exactly as upstream 0.7.4 writes it (yaml.dump, sorted keys)."""
    write_key_file(path, f"private_key: {b64(private)}\npublic_key: {b64(public)}\n".encode())


def test_new_key_is_created_with_private_modes(key_cache):
    keypair = st3._load_or_create_keypair(UUID)
    path = key_cache / UUID
    assert stat.S_IMODE(os.stat(key_cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == (
        f"private_key: {b64(keypair.private)}\npublic_key: {b64(keypair.public)}\n"
    )
    assert st3._public_key(keypair.private) == keypair.public
    assert keypair.private[0] & 7 == 0 and keypair.private[31] & 0xC0 == 0x40  # clamped


def test_key_is_reused_on_the_next_run(key_cache):
    first = st3._load_or_create_keypair(UUID)
    assert st3._load_or_create_keypair(UUID) == first


def test_keys_differ_per_application(key_cache):
    other = "11111111-2222-3333-4444-555555555555"
    assert st3._load_or_create_keypair(UUID) != st3._load_or_create_keypair(other)


def test_upstream_file_with_rfc7748_keys_is_reused_as_is(key_cache):
    path = key_cache / UUID
    write_upstream_file(path, RFC7748_PRIVATE, RFC7748_PUBLIC)
    before = path.read_bytes()
    keypair = st3._load_or_create_keypair(UUID)
    assert keypair.private == RFC7748_PRIVATE
    assert keypair.public == RFC7748_PUBLIC
    assert path.read_bytes() == before


def test_quoted_yaml_values_are_read(key_cache):
    path = key_cache / UUID
    path.parent.mkdir(parents=True)
    path.write_text(
        f"public_key: '{b64(RFC7748_PUBLIC)}'\nprivate_key: \"{b64(RFC7748_PRIVATE)}\"\n"
    )
    path.chmod(0o600)
    assert st3._load_or_create_keypair(UUID).public == RFC7748_PUBLIC


def kept_files(key_cache):
    """The unusable key files set aside next to the key, by name."""
    return sorted(p for p in key_cache.iterdir() if p.name.startswith(f"{UUID}.unreadable-"))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "no private_key"),
        (b"garbage without colon\n", "unexpected line"),
        (f"# written by hand\nprivate_key: {b64(RFC7748_PRIVATE)}\n".encode(), "unexpected line"),
        (f"\ufeffprivate_key: {b64(RFC7748_PRIVATE)}\npublic_key: {b64(RFC7748_PUBLIC)}\n"
         .encode(), "no private_key"),  # a byte order mark
        (f"private_key: {b64(RFC7748_PRIVATE)}\npublic_ke".encode(), "unexpected line"),
        (f"private_key: {b64(RFC7748_PRIVATE)}\n".encode(), "no public_key"),
        (f"private_key: {b64(RFC7748_PRIVATE)[:-4]}\npublic_key: x\n".encode(), "not a 32-byte"),
        (b"\xff\xfe\x00\x01binary", "unexpected line"),
        (
            f"private_key: {b64(RFC7748_PRIVATE)}\npublic_key: {b64(RFC7748_BOB_PUBLIC)}\n"
            .encode(),
            "does not belong",
        ),
    ],
)
def test_unusable_file_is_kept_aside_and_a_new_key_made(key_cache, capsys, content, reason):
    path = key_cache / UUID
    write_key_file(path, content)
    keypair = st3._load_or_create_keypair(UUID)
    [kept] = kept_files(key_cache)
    assert kept.read_bytes() == content
    [warning] = capsys.readouterr().err.splitlines()
    assert warning.startswith("sinfonia-tier3: warning: ") and reason in warning
    assert f"{path} is unusable" in warning and f"kept it as {kept} " in warning
    assert st3._public_key(keypair.private) == keypair.public
    assert st3._load_or_create_keypair(UUID) == keypair  # the new key is on disk
    assert capsys.readouterr().err == ""
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(key_cache)) == [UUID, kept.name]


def test_a_second_unusable_file_never_clobbers_an_earlier_kept_one(key_cache):
    """Both in the same second: names for the next few seconds are taken
    by earlier kept files, so the new one must find a name of its own."""
    path = key_cache / UUID
    write_key_file(path, b"truncated")
    now = int(time.time())
    earlier = {}
    for second in range(now - 1, now + 10):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
        earlier[key_cache / f"{UUID}.unreadable-{stamp}"] = f"earlier {second}".encode()
    for kept, content in earlier.items():
        kept.write_bytes(content)
    st3._load_or_create_keypair(UUID)
    [new] = set(kept_files(key_cache)) - set(earlier)
    assert new.read_bytes() == b"truncated" and new.name.endswith("-2")
    assert all(kept.read_bytes() == content for kept, content in earlier.items())


def test_symlinked_key_file_is_refused(key_cache, tmp_path):
    target = tmp_path / "elsewhere"
    write_upstream_file(target, RFC7748_PRIVATE, RFC7748_PUBLIC)
    key_cache.mkdir(parents=True)
    (key_cache / UUID).symlink_to(target)
    with pytest.raises(st3.KeyCacheError, match="symlink"):
        st3._load_or_create_keypair(UUID)


def test_symlinked_cache_directory_is_refused(key_cache, tmp_path):
    real = tmp_path / "real-dir"
    real.mkdir(mode=0o700)
    key_cache.parent.mkdir(parents=True)
    key_cache.symlink_to(real)
    with pytest.raises(st3.KeyCacheError, match="symlink"):
        st3._load_or_create_keypair(UUID)


def test_key_file_owned_by_someone_else_is_refused(key_cache):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    path = key_cache / UUID
    write_upstream_file(path, RFC7748_PRIVATE, RFC7748_PUBLIC)
    os.chown(path, 65534, 65534)
    with pytest.raises(st3.KeyCacheError, match="owned by uid 65534"):
        st3._load_or_create_keypair(UUID)


def test_cache_directory_owned_by_someone_else_is_refused(key_cache):
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    key_cache.mkdir(parents=True, mode=0o700)
    os.chown(key_cache, 65534, 65534)
    with pytest.raises(st3.KeyCacheError, match="owned by uid 65534"):
        st3._load_or_create_keypair(UUID)


def test_loose_modes_are_tightened(key_cache, capsys):
    path = key_cache / UUID
    write_upstream_file(path, RFC7748_PRIVATE, RFC7748_PUBLIC)
    os.chmod(path, 0o644)
    os.chmod(key_cache, 0o755)
    assert st3._load_or_create_keypair(UUID).public == RFC7748_PUBLIC
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(key_cache).st_mode) == 0o700
    assert "readable by others" in capsys.readouterr().err


def test_unwritable_cache_is_one_clear_error(key_cache, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(st3.KeyCacheError, match="key cache .*not-a-dir"):
        st3._load_or_create_keypair(UUID)


@pytest.mark.parametrize("umask", [0o077, 0o000, 0o022, 0o277], ids="umask-{:03o}".format)
def test_directories_made_are_0700_and_the_key_0600_whatever_the_umask(
        key_cache, tmp_path, umask):
    """$XDG_CACHE_HOME is missing too: both it and sinfonia/ are made; the
    existing parent above them keeps its mode."""
    parent_mode = stat.S_IMODE(os.stat(tmp_path).st_mode)
    old = os.umask(umask)
    try:
        st3._load_or_create_keypair(UUID)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(key_cache.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(key_cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == parent_mode
    assert stat.S_IMODE(os.stat(key_cache / UUID).st_mode) == 0o600


def run_on_read_only_cache(cache_home, *args):
    """The command line with `cache_home` a real read-only bind mount, in a
    private mount namespace of its own (root, or an unprivileged user
    namespace); skips where neither can be had."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private mount namespace")
    namespace = ["--mount"] if os.geteuid() == 0 else ["--map-root-user", "--mount"]
    result = subprocess.run(
        ["unshare", *namespace, "sh", "-c",
         'mount --bind -o ro "$0" "$0" || exit 99; exec "$@"', str(cache_home),
         sys.executable, str(REPO / "sinfonia_tier3.py"), *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode == 99 or "unshare failed" in result.stderr:
        pytest.skip(f"no read-only bind mount here: {result.stderr.strip()}")
    return result


READ_ONLY_FAILURES = {
    "loose-directory": r"key cache .*/sinfonia: Read-only file system",
    "loose-file": r"key file .* readable by others and cannot be made 0600: Read-only file system",
    "unusable-file": r"key file .* is unusable \(unexpected line\) and cannot be moved aside: "
                     r"Read-only file system",
}


@pytest.mark.parametrize("case", READ_ONLY_FAILURES)
def test_read_only_cache_that_needs_a_change_is_one_line(key_cache, cloudlet, case):
    path = key_cache / UUID
    write_key_file(path, b"truncat")
    if case != "unusable-file":
        write_upstream_file(path, RFC7748_PRIVATE, RFC7748_PUBLIC)
    os.chmod(key_cache, 0o755 if case == "loose-directory" else 0o700)
    os.chmod(path, 0o644 if case == "loose-file" else 0o600)
    before = path.read_bytes()
    result = run_on_read_only_cache(key_cache.parent, "--json", cloudlet.url, "helloworld")
    assert result.returncode == 125, result.stderr
    [line] = result.stderr.splitlines()
    assert re.fullmatch("sinfonia-tier3: " + READ_ONLY_FAILURES[case], line), line
    assert json.loads(result.stdout)["error"]["kind"] == "key_cache"
    assert sorted(os.listdir(key_cache)) == [UUID] and path.read_bytes() == before


def test_read_only_cache_with_a_good_key_is_used(key_cache, cloudlet):
    write_upstream_file(key_cache / UUID, RFC7748_PRIVATE, RFC7748_PUBLIC)
    result = run_on_read_only_cache(key_cache.parent, "--json", cloudlet.url, "helloworld")
    assert result.returncode == 0, result.stderr
    (deployment,) = json.loads(result.stdout)
    assert deployment["ClientPublicKey"] == b64(RFC7748_PUBLIC)
    assert sorted(os.listdir(key_cache)) == [UUID]


def test_existing_key_file_is_never_overwritten(key_cache):
    first = st3._load_or_create_keypair(UUID)
    path = key_cache / UUID
    before = path.read_bytes()
    assert not st3._store_keypair(str(path), st3._generate_keypair())
    assert path.read_bytes() == before
    assert sorted(os.listdir(key_cache)) == [UUID]  # no temporary file left
    assert st3._load_or_create_keypair(UUID) == first


def test_failed_write_of_the_new_key_keeps_the_unusable_one(key_cache, monkeypatch):
    path = key_cache / UUID
    write_key_file(path, b"private_key: trunc")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", no_space)  # a full disk cannot be had here
        with pytest.raises(st3.KeyCacheError, match="No space"):
            st3._load_or_create_keypair(UUID)
    [kept] = kept_files(key_cache)
    assert kept.read_bytes() == b"private_key: trunc"
    assert sorted(os.listdir(key_cache)) == [kept.name]  # no temporary file, no half key
    keypair = st3._load_or_create_keypair(UUID)
    assert st3._parse_key_file(path.read_text()) == keypair


def _create_in_child(cache_home, queue):
    os.environ["XDG_CACHE_HOME"] = cache_home
    queue.put(st3._load_or_create_keypair(UUID).public)


def public_keys_of_runs_at_once(count):
    """The public keys that `count` forked runs, started together, got."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [
        context.Process(
            target=_create_in_child, args=(os.environ["XDG_CACHE_HOME"], queue)
        )
        for _ in range(count)
    ]
    for child in children:
        child.start()
    publics = {queue.get(timeout=30) for _ in children}
    for child in children:
        child.join(30)
    return publics


def test_concurrent_first_runs_agree_on_one_key(key_cache):
    publics = public_keys_of_runs_at_once(4)
    assert publics == {st3._load_or_create_keypair(UUID).public}
    assert sorted(os.listdir(key_cache)) == [UUID]


def test_concurrent_runs_on_an_unusable_file_keep_it_once_and_agree_on_one_key(
    key_cache, capfd
):
    path = key_cache / UUID
    write_key_file(path, b"private_key: trunc")
    publics = public_keys_of_runs_at_once(4)
    assert publics == {st3._load_or_create_keypair(UUID).public}
    [kept] = kept_files(key_cache)
    assert kept.read_bytes() == b"private_key: trunc"
    assert sorted(os.listdir(key_cache)) == [UUID, kept.name]
    assert capfd.readouterr().err.count("is unusable") == 1


def test_a_run_waits_while_another_moves_the_unusable_file_then_uses_its_key(key_cache):
    """This test plays the other run: it holds the lock on the unusable file
    while a run starts, then moves the file and makes a key; the run must
    neither move that key nor make one of its own."""
    path = key_cache / UUID
    write_key_file(path, b"private_key: trunc")
    code = ("import sinfonia_tier3 as st3; "
            f"print(st3._key_text(st3._load_or_create_keypair({UUID!r}).public))")
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        run = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                               text=True)
        time.sleep(0.5)
        assert run.poll() is None  # it waits for the lock
        os.rename(path, key_cache / f"{UUID}.unreadable-by-the-other-run")
        theirs = st3._generate_keypair()
        assert st3._store_keypair(str(path), theirs)
    assert run.communicate(timeout=30)[0] == f"{b64(theirs.public)}\n"
    assert sorted(os.listdir(key_cache)) == [UUID, f"{UUID}.unreadable-by-the-other-run"]
    assert st3._load_or_create_keypair(UUID) == theirs


def test_xdg_default_is_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert st3._key_cache_dir() == str(tmp_path / ".cache" / "sinfonia")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored by the XDG rules
    assert st3._key_cache_dir() == str(tmp_path / ".cache" / "sinfonia")


def test_private_key_is_not_in_repr():
    keypair = st3._KeyPair(RFC7748_PRIVATE, RFC7748_PUBLIC)
    assert RFC7748_PRIVATE.hex() not in repr(keypair)
    assert repr(RFC7748_PRIVATE) not in repr(keypair)
