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
