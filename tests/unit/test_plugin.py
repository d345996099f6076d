"""The twistd plugin is found and its start-up errors are one clear line."""

import os
import subprocess
import sys
from pathlib import Path

import storage

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def env():
    e = dict(os.environ)
    root = str(Path(storage.__file__).parent.parent)
    e["PYTHONPATH"] = root + os.pathsep + e.get("PYTHONPATH", "")
    return e


def test_plugin_is_listed_by_twistd():
    out = subprocess.run(TWISTD + ["--help"], capture_output=True, text=True, env=env(), timeout=60)
    assert "storage-proxy" in out.stdout


def test_invalid_config_is_one_line_and_nonzero(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(
        '[storage-proxy]\nsecret = "x"\nmax-upload-size = "lots"\n'
        '[api.manager]\nsecret = "y"\n[volume.local]\nbackend = "vfs"\npath = "/tmp"\n'
    )
    out = subprocess.run(
        TWISTD + ["-n", "--pidfile=", "storage-proxy", "--config", str(config)],
        capture_output=True, text=True, env=env(), timeout=60, cwd=tmp_path,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert lines == ["storage-proxy: config: [storage-proxy] max-upload-size: expected a size such as '100g', got 'lots'"]
    assert "Traceback" not in out.stdout + out.stderr


def test_missing_config_file_is_one_line(tmp_path):
    out = subprocess.run(
        TWISTD + ["-n", "--pidfile=", "storage-proxy", "--config", str(tmp_path / "nope.toml")],
        capture_output=True, text=True, env=env(), timeout=60, cwd=tmp_path,
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [f"storage-proxy: config: {tmp_path / 'nope.toml'}: cannot read: No such file or directory"]


def test_drops_privileges_after_binding(tmp_path):
    import pwd
    import re
    import time

    import pytest

    if os.getuid() != 0:
        pytest.skip("needs root to drop privileges")
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    # pytest's tmp_path sits under a 0700 directory that nobody cannot enter.
    shared = Path(tempfile.mkdtemp(prefix="storage-proxy-priv-"))
    os.chmod(shared, 0o755)
    vol = shared / "vol"
    vol.mkdir()
    os.chown(vol, nobody.pw_uid, nobody.pw_gid)
    config = tmp_path / "c.toml"
    config.write_text(
        '[storage-proxy]\nsecret = "x"\nuser = "nobody"\n'
        '[api.manager]\nsecret = "y"\nservice-addr = {host = "127.0.0.1", port = 0}\n'
        '[api.client]\nservice-addr = {host = "127.0.0.1", port = 0}\n'
        f'[volume.local]\nbackend = "vfs"\npath = "{vol}"\n'
    )
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "storage-proxy", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 30
        while "client API listening" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        # The ports are bound (and logged) before twistd sheds privileges.
        while time.monotonic() < deadline:
            status = open(f"/proc/{proc.pid}/status").read()
            uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
            if set(uids) != {"0"}:
                break
            time.sleep(0.05)
        assert set(uids) == {str(nobody.pw_uid)}
        assert proc.poll() is None
        # Requests still work after the drop (lazy imports were loaded while root).
        import json
        import urllib.request

        port = re.search(r"manager API listening on [\d.]+:(\d+)", log.read_text()).group(1)
        for path in ("/", "/no-such-route"):
            try:
                resp = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30)
            except urllib.error.HTTPError as exc:
                resp = exc
            assert "json" in resp.headers["Content-Type"], resp.read()
            assert json.loads(resp.read())
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(shared, ignore_errors=True)


def test_a_volume_that_fails_its_start_up_check_stops_the_daemon(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        '[storage-proxy]\nsecret = "x"\n'
        '[api.manager]\nsecret = "y"\nservice-addr = {host = "127.0.0.1", port = 0}\n'
        '[api.client]\nservice-addr = {host = "127.0.0.1", port = 0}\n'
        f'[volume.local]\nbackend = "vfs"\npath = "{tmp_path / "missing"}"\n'
    )
    out = subprocess.run(
        TWISTD + ["-n", "--pidfile=", "storage-proxy", "--config", str(config)],
        capture_output=True, text=True, env=env(), timeout=60, cwd=tmp_path,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"storage-proxy: config: [volume.local] path: not a directory: {tmp_path / 'missing'}"
    ]
