"""The command line as a user runs it (a real process against the test
cloudlet): arguments, exit statuses, --json, --config-debug, --qrcode, --debug."""

import base64
import json
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
import uuid

import pytest
import sessions
from checkout import REPO
from cloudlet import HELLOWORLD
from conftest import run_cli
from netns import require_programs

import sinfonia_tier3 as st3

OUTPUT_MODES = ("--json", "--config-debug", "--qrcode")


def cached_keypair(key_cache):
    return st3._parse_key_file((key_cache / HELLOWORLD).read_text())


def assert_one_line_failure(result, status=125):
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("sinfonia-tier3: ")
    assert "Traceback" not in result.stderr
    return lines[-1]


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"sinfonia-tier3 {st3.__version__}\n"


def test_python_dash_m_works(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sinfonia_tier3", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("sinfonia-tier3 ")


def test_installed_console_script():
    script = pathlib.Path(sys.executable).with_name("sinfonia-tier3")
    if not script.exists():
        pytest.skip("the package is not installed next to this python (pip install .)")
    result = subprocess.run(
        [str(script), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("sinfonia-tier3 ")


@pytest.mark.parametrize("option", ["--version", "--help"])
def test_version_and_help_import_nothing_heavy(option):
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "before = set(sys.modules)\n"
        "import sinfonia_tier3\n"
        "try:\n"
        f"    sinfonia_tier3.main([{option!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('nacl', 'pyroute2', 'urllib', 'ssl', 'http', 'json', 'ipaddress',"
        " 'segno', 'socket')\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(m for m in new if m.split('.')[0] in heavy), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.stderr.strip() == "[]"


def test_help_lists_options_and_exit_statuses():
    result = run_cli("--help")
    assert result.returncode == 0
    for text in (
        "--version",
        "--debug",
        "--config-debug",
        "--json",
        "--timeout SECONDS",
        "--results N",
        "--qrcode {compact,alt}",
        "TIER1_URL APPLICATION",
    ):
        assert text in result.stdout
    for status in ("0 ", "128+N", "2 ", "125", "126", "127"):
        assert f"\n  {status}" in result.stdout
    assert "130 for Ctrl-C" in result.stdout and "141 when the reader" in result.stdout


def test_help_works_without_docstrings():
    """python -OO, as some embedded installs run it, drops __doc__."""
    result = subprocess.run([sys.executable, "-OO", "-m", "sinfonia_tier3", "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sinfonia-tier3 [options] TIER1_URL")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["http://127.0.0.1:9"],
        ["http://127.0.0.1:9", "not-an-app"],
        ["ftp://127.0.0.1:9", "helloworld"],
        ["--timeout", "0", "http://127.0.0.1:9", "helloworld"],
        ["--timeout", "soon", "http://127.0.0.1:9", "helloworld"],
        ["--results", "0", "http://127.0.0.1:9", "helloworld"],
        ["--qrcode", "big", "http://127.0.0.1:9", "helloworld"],
        ["--no-such-option", "http://127.0.0.1:9", "helloworld"],
    ],
)
def test_bad_arguments_give_usage_and_status_2(args):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "usage: sinfonia-tier3 [options] TIER1_URL APPLICATION"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [[], ["--", "true"], ["sh", "-c", "exit 3"]])
def test_a_command_waits_for_the_cloudlets_handshake(cloudlet, command):
    if sessions.tun_closed():  # as a user, where it is 0600: --tunnel auto takes sudo
        pytest.skip(f"the userspace tunnel needs /dev/net/tun: {sessions.tun_closed()}")
    # The test cloudlet's default WireGuard endpoint is a port nobody serves
    # (tests/test_e2e.py has the runs where a tunnel comes up).
    result = run_cli("--connect-timeout", "0.5", cloudlet.url, "helloworld", *command)
    line = assert_one_line_failure(result)
    assert "the cloudlet did not answer at its endpoint" in line


def test_json_prints_deployments_with_the_public_key_only(cloudlet, key_cache):
    result = run_cli("--json", cloudlet.url, "helloworld")
    assert result.returncode == 0, result.stderr
    (document,) = json.loads(result.stdout)
    keypair = cached_keypair(key_cache)
    public = base64.b64encode(keypair.public).decode()
    assert document["ClientPublicKey"] == public == document["ApplicationKey"]
    assert document["UUID"] == HELLOWORLD and document["Status"] == "Deployed"
    assert document["TunnelConfig"]["endpoint"] == cloudlet.wireguard.endpoint
    assert document["TunnelConfig"]["dns"][0] == "10.43.0.10"
    private = base64.b64encode(keypair.private).decode()
    assert private not in result.stdout and private not in result.stderr
    assert "deployed helloworld-" in result.stderr  # progress goes to stderr


@pytest.mark.parametrize(
    "setup, kind",
    [
        (lambda c: setattr(c, "backends", set()), "refused"),
        (lambda c: setattr(c, "misbehaviour", "html"), "bad_response"),
        (lambda c: setattr(c, "misbehaviour", "slow-headers"), "timeout"),
    ],
)
def test_json_failure_is_json_too(cloudlet, setup, kind):
    setup(cloudlet)
    result = run_cli("--json", "--timeout", "1", cloudlet.url, "helloworld")
    line = assert_one_line_failure(result)
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == kind
    assert f"sinfonia-tier3: {error['message']}" == line


def test_reader_going_away_is_no_traceback(cloudlet, tmp_path):
    reader = subprocess.Popen(
        [sys.executable, str(REPO / "sinfonia_tier3.py"), "--json", "--results", "3",
         cloudlet.url, "helloworld"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    reader.stdout.close()  # like `| head -0`
    stderr = reader.stderr.read()
    assert reader.wait(timeout=60) == 141
    assert "Traceback" not in stderr and "Exception" not in stderr


def test_unreachable_tier1():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli("--json", f"http://127.0.0.1:{port}", "helloworld")
    assert_one_line_failure(result)
    assert json.loads(result.stdout)["error"]["kind"] == "unreachable"


def test_unusable_key_cache(cloudlet, key_cache, tmp_path):
    target = tmp_path / "target"
    target.write_text("")
    key_cache.mkdir(parents=True)
    (key_cache / HELLOWORLD).symlink_to(target)
    result = run_cli("--json", cloudlet.url, "helloworld")
    line = assert_one_line_failure(result)
    assert "symlink" in line
    assert json.loads(result.stdout)["error"]["kind"] == "key_cache"


def test_config_debug_writes_both_files(cloudlet, key_cache, tmp_path):
    result = run_cli("--config-debug", cloudlet.url, "helloworld", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    keypair = cached_keypair(key_cache)
    (deployment,) = st3.deploy(cloudlet.url, "helloworld")
    wg_conf = tmp_path / "wg.conf"
    resolv_conf = tmp_path / "resolv.conf"
    assert wg_conf.read_text() == st3._render_wg_quick(deployment.tunnel_config, keypair)
    assert resolv_conf.read_text() == (
        "nameserver 10.43.0.10\n"
        "search app-00000000.svc.cluster.local svc.cluster.local cluster.local\n"
        "options ndots:5\n"
    )
    for path in (wg_conf, resolv_conf):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["resolv.conf", "wg.conf", "xdg-cache"]
    text = wg_conf.read_text()
    assert f"PrivateKey = {base64.b64encode(keypair.private).decode()}\n" in text
    assert "Address = 10.0.0.2/32\n" in text
    assert "DNS = 10.43.0.10, app-00000000.svc.cluster.local" in text
    assert f"Endpoint = {cloudlet.wireguard.endpoint}\n" in text


def wg_showconf_after_setconf(conf_path):
    """`wg showconf` of a wireguard-go interface configured with `wg setconf
    CONF`, in a network namespace of its own that ends with the command."""
    name = f"sft{uuid.uuid4().hex[:8]}"
    script = (
        f"WG_PROCESS_FOREGROUND=1 wireguard-go {name} 2>/dev/null & "
        f"for i in $(seq 50); do [ -S /var/run/wireguard/{name}.sock ] && break; "
        "sleep 0.1; done; "
        f"wg setconf {name} {conf_path} && wg showconf {name}; status=$?; "
        "kill $!; wait; exit $status"
    )
    return subprocess.run(
        ["unshare", "--net", "--fork", "--kill-child", "sh", "-c", script],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.interop
def test_config_debug_wg_conf_loads_into_wireguard_go(cloudlet, key_cache, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    require_programs("wg", "wg-quick", "wireguard-go", "unshare")
    assert (
        run_cli("--config-debug", cloudlet.url, "helloworld", cwd=tmp_path).returncode
        == 0
    )
    stripped = subprocess.run(
        ["wg-quick", "strip", str(tmp_path / "wg.conf")],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    (tmp_path / "stripped.conf").write_text(stripped)
    result = wg_showconf_after_setconf(tmp_path / "stripped.conf")
    assert result.returncode == 0, result.stderr
    keypair = cached_keypair(key_cache)
    (deployment,) = st3.deploy(cloudlet.url, "helloworld")
    shown = result.stdout
    assert f"PrivateKey = {base64.b64encode(keypair.private).decode()}" in shown
    peer_key = base64.b64encode(deployment.tunnel_config.public_key).decode()
    assert f"PublicKey = {peer_key}" in shown
    assert f"Endpoint = {cloudlet.wireguard.endpoint}" in shown
    assert "AllowedIPs = 10.0.0.0/16, 10.43.0.0/16" in shown
    assert "PersistentKeepalive = 30" in shown


def test_debug_shows_request_and_never_the_private_key(cloudlet, key_cache):
    result = run_cli("--debug", "--json", cloudlet.url, "helloworld")
    assert result.returncode == 0
    assert f"debug: POST {cloudlet.url}/api/v1/deploy/{HELLOWORLD}/" in result.stderr
    assert "debug: HTTP 200 OK, application/json" in result.stderr
    assert "debug: chosen deployment: {" in result.stderr
    private = cached_keypair(key_cache).private
    for encoded in (base64.b64encode(private), base64.urlsafe_b64encode(private)):
        assert encoded.decode().rstrip("=") not in result.stderr + result.stdout


def test_results_option_reaches_the_server(cloudlet):
    assert (
        run_cli("--json", "--results", "3", cloudlet.url, "helloworld").returncode == 0
    )
    assert cloudlet.requests[-1][1].endswith("?results=3")


# QR codes -----------------------------------------------------------------


def qr_modules_alt(text):
    """Module rows of `--qrcode alt` output: one emoji square per module."""
    return [[c == "⬛" for c in line] for line in text.splitlines() if line]


def qr_modules_compact(text):
    """Module rows of `--qrcode compact` output: two rows per text line;
    segno draws the light modules in the foreground colour."""
    light = {
        "█": (True, True),
        "▀": (True, False),
        "▄": (False, True),
        " ": (False, False),
    }
    rows = []
    for line in text.splitlines():
        if line:
            pairs = [light[c] for c in line]
            rows.append([not top for top, _ in pairs])
            rows.append([not bottom for _, bottom in pairs])
    return rows


def decode_qr(modules, scale=4):
    """The text in a module matrix, through the zxing-cpp decoder."""
    zxingcpp = pytest.importorskip("zxingcpp")
    width = max(len(row) for row in modules) + 8
    pixels = bytearray()
    for row in [[]] * 4 + modules + [[]] * 4:
        padded = [False] * 4 + row + [False] * (width - len(row) - 4)
        line = bytes(0 if dark else 255 for dark in padded for _ in range(scale))
        pixels += line * scale
    image = memoryview(bytes(pixels)).cast(
        "B", (len(modules) * scale + 8 * scale, width * scale)
    )
    (code,) = zxingcpp.read_barcodes(image)
    return code.text


@pytest.mark.parametrize(
    "style, parse", [("alt", qr_modules_alt), ("compact", qr_modules_compact)]
)
def test_qrcode_decodes_back_to_the_wg_quick_config(cloudlet, key_cache, style, parse):
    pytest.importorskip("segno")
    result = run_cli(
        "--qrcode", style, cloudlet.url, "helloworld", "--", "org.example.app"
    )
    assert result.returncode == 0, result.stderr
    (deployment,) = st3.deploy(cloudlet.url, "helloworld")
    expected = st3._render_wg_quick(
        deployment.tunnel_config, cached_keypair(key_cache), ["org.example.app"]
    )
    assert "IncludedApplications = org.example.app\n" in expected
    assert decode_qr(parse(result.stdout)) == expected


@pytest.mark.parametrize("name", ["org.example.app\nPostUp = x", "org..app", "a b"])
def test_qrcode_takes_only_android_package_names(cloudlet, name):
    result = run_cli("--qrcode", "alt", cloudlet.url, "helloworld", "--", name)
    assert_one_line_failure(result, status=2)
    assert "not an Android package name" in result.stderr
    assert not cloudlet.requests, "refused before deploying"


def test_qrcode_without_segno_says_how_to_get_it(cloudlet, tmp_path):
    # -S leaves out site-packages, so segno is really not importable.
    result = subprocess.run(
        [
            sys.executable,
            "-S",
            str(REPO / "sinfonia_tier3.py"),
            "--qrcode",
            "compact",
            cloudlet.url,
            "helloworld",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    line = assert_one_line_failure(result)
    assert (
        line == "sinfonia-tier3: --qrcode needs segno: pip install segno (this project's qr extra)"
    )
    assert cloudlet.requests == []


# The library API -------------------------------------------------------------


def test_upstream_entry_point_signature_and_config_debug(
    cloudlet, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    status = st3.sinfonia_tier3(
        cloudlet.url, uuid.UUID(HELLOWORLD), ["true"], config_debug=True
    )
    assert status == 0
    assert (tmp_path / "wg.conf").exists() and (tmp_path / "resolv.conf").exists()


def test_upstream_entry_point_returns_125_with_one_line(cloudlet, capsys):
    cloudlet.backends = set()
    assert st3.sinfonia_tier3(cloudlet.url, HELLOWORLD, [], config_debug=True) == 125
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith("sinfonia-tier3: Tier 1 refused the deployment: HTTP 404")
    )


# Other ways users reach the module ---------------------------------------------


def test_vendored_copy_under_another_package_name(cloudlet, tmp_path):
    vendor = tmp_path / "myapp" / "_vendor"
    vendor.mkdir(parents=True)
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    shutil.copy(REPO / "sinfonia_tier3.py", vendor / "sinfonia_tier3.py")
    probe = (
        "from myapp._vendor import sinfonia_tier3 as s\n"
        f"(d,) = s.deploy({cloudlet.url!r}, 'helloworld')\n"
        "print(d.uuid, d.tunnel_config.endpoint)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{HELLOWORLD} {cloudlet.wireguard.endpoint}\n"


def test_zipapp(cloudlet, tmp_path):
    source = tmp_path / "app"
    source.mkdir()
    shutil.copy(REPO / "sinfonia_tier3.py", source / "sinfonia_tier3.py")
    (source / "__main__.py").write_text(
        "import sys\nimport sinfonia_tier3\nsys.exit(sinfonia_tier3.main())\n"
    )
    archive = tmp_path / "sinfonia-tier3.pyz"
    subprocess.run(
        [sys.executable, "-m", "zipapp", str(source), "-o", str(archive)],
        check=True,
        timeout=60,
    )
    result = subprocess.run(
        [sys.executable, str(archive), "--json", cloudlet.url, "helloworld"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["UUID"] == HELLOWORLD
