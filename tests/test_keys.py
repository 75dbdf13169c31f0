"""The per-application key cache (DESIGN §3): upstream's format, atomic
writes, modes, and refusal of files that are not safely ours."""

import base64
import json
import multiprocessing
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
from conftest import ROOT

import sinfonia_tier3 as st

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


def write_upstream_file(path, private, public):
    """A key file exactly as upstream 0.7.4 writes it (yaml.dump, sorted keys)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(f"private_key: {b64(private)}\npublic_key: {b64(public)}\n")
    path.chmod(0o600)


def test_new_key_is_created_with_private_modes(key_cache):
    keypair = st._load_or_create_keypair(UUID)
    path = key_cache / UUID
    assert stat.S_IMODE(os.stat(key_cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == (
        f"private_key: {b64(keypair.private)}\npublic_key: {b64(keypair.public)}\n"
    )
    assert st._public_key(keypair.private) == keypair.public
    assert keypair.private[0] & 7 == 0 and keypair.private[31] & 0xC0 == 0x40  # clamped


def test_key_is_reused_on_the_next_run(key_cache):
    first = st._load_or_create_keypair(UUID)
    assert st._load_or_create_keypair(UUID) == first


def test_keys_differ_per_application(key_cache):
    other = "11111111-2222-3333-4444-555555555555"
    assert st._load_or_create_keypair(UUID) != st._load_or_create_keypair(other)


def test_upstream_file_with_rfc7748_keys_is_reused_as_is(key_cache):
    path = key_cache / UUID
    write_upstream_file(path, RFC7748_PRIVATE, RFC7748_PUBLIC)
    before = path.read_bytes()
    keypair = st._load_or_create_keypair(UUID)
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
    assert st._load_or_create_keypair(UUID).public == RFC7748_PUBLIC


@pytest.mark.parametrize(
    "content, reason",
    [
        ("", "no private_key"),
        ("garbage without colon\n", "unexpected line"),
        (f"private_key: {b64(RFC7748_PRIVATE)}\n", "no public_key"),
        (f"private_key: {b64(RFC7748_PRIVATE)[:-4]}\npublic_key: x\n", "not a 32-byte"),
        (
            f"private_key: {b64(RFC7748_PRIVATE)}\npublic_key: {b64(RFC7748_BOB_PUBLIC)}\n",
            "does not belong",
        ),
    ],
)
def test_corrupt_or_mismatched_file_is_replaced_with_a_warning(
    key_cache, capsys, content, reason
):
    path = key_cache / UUID
    path.parent.mkdir(parents=True)
    path.write_text(content)
    path.chmod(0o600)
    keypair = st._load_or_create_keypair(UUID)
    warning = capsys.readouterr().err
    assert "warning" in warning and reason in warning and str(path) in warning
    assert st._public_key(keypair.private) == keypair.public
    assert st._load_or_create_keypair(UUID) == keypair  # the replacement is on disk
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_symlinked_key_file_is_refused(key_cache, tmp_path):
    target = tmp_path / "elsewhere"
    write_upstream_file(target, RFC7748_PRIVATE, RFC7748_PUBLIC)
    key_cache.mkdir(parents=True)
    (key_cache / UUID).symlink_to(target)
    with pytest.raises(st.KeyCacheError, match="symlink"):
        st._load_or_create_keypair(UUID)


def test_symlinked_cache_directory_is_refused(key_cache, tmp_path):
    real = tmp_path / "real-dir"
    real.mkdir(mode=0o700)
    key_cache.parent.mkdir(parents=True)
    key_cache.symlink_to(real)
    with pytest.raises(st.KeyCacheError, match="symlink"):
        st._load_or_create_keypair(UUID)


def test_key_file_owned_by_someone_else_is_refused(key_cache):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    path = key_cache / UUID
    write_upstream_file(path, RFC7748_PRIVATE, RFC7748_PUBLIC)
    os.chown(path, 65534, 65534)
    with pytest.raises(st.KeyCacheError, match="owned by uid 65534"):
        st._load_or_create_keypair(UUID)


def test_cache_directory_owned_by_someone_else_is_refused(key_cache):
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    key_cache.mkdir(parents=True, mode=0o700)
    os.chown(key_cache, 65534, 65534)
    with pytest.raises(st.KeyCacheError, match="owned by uid 65534"):
        st._load_or_create_keypair(UUID)


def test_loose_modes_are_tightened(key_cache, capsys):
    path = key_cache / UUID
    write_upstream_file(path, RFC7748_PRIVATE, RFC7748_PUBLIC)
    os.chmod(path, 0o644)
    os.chmod(key_cache, 0o755)
    assert st._load_or_create_keypair(UUID).public == RFC7748_PUBLIC
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(key_cache).st_mode) == 0o700
    assert "readable by others" in capsys.readouterr().err


def test_unwritable_cache_is_one_clear_error(key_cache, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(st.KeyCacheError, match="key cache .*not-a-dir"):
        st._load_or_create_keypair(UUID)


@pytest.mark.parametrize("umask", [0o077, 0o000, 0o022, 0o277], ids="umask-{:03o}".format)
def test_directories_made_are_0700_whatever_the_umask(key_cache, tmp_path, umask):
    """$XDG_CACHE_HOME is missing too: both it and sinfonia/ are made; the
    existing parent above them keeps its mode."""
    parent_mode = stat.S_IMODE(os.stat(tmp_path).st_mode)
    old = os.umask(umask)
    try:
        st._load_or_create_keypair(UUID)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(key_cache.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(key_cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == parent_mode


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
         sys.executable, str(ROOT / "sinfonia_tier3.py"), *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode == 99 or "unshare failed" in result.stderr:
        pytest.skip(f"no read-only bind mount here: {result.stderr.strip()}")
    return result


READ_ONLY_FAILURES = {
    "loose-directory": r"key cache .*/sinfonia: Read-only file system",
    "loose-file": r"key file .* readable by others and cannot be made 0600: Read-only file system",
}


@pytest.mark.parametrize("case", READ_ONLY_FAILURES)
def test_read_only_cache_that_needs_a_change_is_one_line(key_cache, cloudlet, case):
    path = key_cache / UUID
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


def test_write_is_atomic_and_leaves_no_temporary_file(key_cache):
    st._load_or_create_keypair(UUID)
    st._store_keypair(str(key_cache / UUID), st._generate_keypair(), replace=True)
    assert sorted(os.listdir(key_cache)) == [UUID]


def test_failed_write_keeps_the_old_file(key_cache, monkeypatch):
    first = st._load_or_create_keypair(UUID)

    def no_space(fd):
        raise OSError(28, "No space left on device")

    with (
        monkeypatch.context() as patch,
        pytest.raises(st.KeyCacheError, match="No space"),
    ):
        patch.setattr(os, "fsync", no_space)  # a full disk cannot be had here
        st._store_keypair(str(key_cache / UUID), st._generate_keypair(), replace=True)
    assert sorted(os.listdir(key_cache)) == [UUID]
    assert st._load_or_create_keypair(UUID) == first


def _create_in_child(cache_home, queue):
    os.environ["XDG_CACHE_HOME"] = cache_home
    queue.put(st._load_or_create_keypair(UUID).public)


def test_concurrent_first_runs_agree_on_one_key(key_cache):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [
        context.Process(
            target=_create_in_child, args=(os.environ["XDG_CACHE_HOME"], queue)
        )
        for _ in range(4)
    ]
    for child in children:
        child.start()
    publics = {queue.get(timeout=30) for _ in children}
    for child in children:
        child.join(30)
    assert publics == {st._load_or_create_keypair(UUID).public}
    assert sorted(os.listdir(key_cache)) == [UUID]


def test_xdg_default_is_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert st._key_cache_dir() == str(tmp_path / ".cache" / "sinfonia")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored by the XDG rules
    assert st._key_cache_dir() == str(tmp_path / ".cache" / "sinfonia")


def test_private_key_is_not_in_repr():
    keypair = st._KeyPair(RFC7748_PRIVATE, RFC7748_PUBLIC)
    assert RFC7748_PRIVATE.hex() not in repr(keypair)
    assert repr(RFC7748_PRIVATE) not in repr(keypair)
