"""``[volume.NAME.options]`` of an xfs volume, and the helper command line built from them."""

from __future__ import annotations

import sys

import pytest
from twisted.internet import reactor

from backends.base import VolumeContext
from backends.xfs import XfsVolume
from backends.xfs.options import parse_options
from storage.blocking import BlockingPool
from storage.config import ConfigError, VolumeConfig


def test_defaults():
    o = parse_options("v1", {})
    assert o.helper_socket == "/run/storage-proxy/xfs-v1.sock"
    assert (o.projects_file, o.projid_file) == ("/etc/projects", "/etc/projid")
    assert o.helper_command == [sys.executable, "-m", "backends.xfs.helper"]
    assert o.spawn_helper and o.require_pquota and o.helper_timeout == 30.0
    assert o.helper_start_timeout == 120.0


def test_hyphens_or_underscores_and_user_names():
    o = parse_options("v", {"projects_file": "/x/projects", "helper-timeout": "2m", "helper_allowed_uids": ["root", 7]})
    assert o.projects_file == "/x/projects" and o.helper_timeout == 120.0
    assert o.helper_allowed_uids == (0, 7)


@pytest.mark.parametrize(
    "options, key",
    [
        ({"helper-socket": "relative.sock"}, "helper-socket"),
        ({"projid-file": 5}, "projid-file"),
        ({"helper-command": []}, "helper-command"),
        ({"helper-command": "no-such-program-here --x"}, "helper-command"),
        ({"spawn-helper": "yes"}, "spawn-helper"),
        ({"require-pquota": 1}, "require-pquota"),
        ({"helper-allowed-uids": ["no-such-user-here"]}, "helper-allowed-uids"),
        ({"helper-timeout": "soon"}, "helper-timeout"),
        ({"helper-start-timeout": "later"}, "helper-start-timeout"),
    ],
)
def test_bad_values_name_the_key(options, key):
    with pytest.raises(ConfigError) as info:
        parse_options("v", options)
    assert key in str(info.value)


def test_helper_argv(tmp_path):
    options = {"helper-socket": "/run/x.sock", "projects-file": "/p", "projid-file": "/i",
               "limits-file": "/l", "lock-file": "/k", "xfs-quota": "/q", "helper-allowed-uids": [1234]}
    vol = XfsVolume(VolumeConfig("v", "xfs", tmp_path, ".", options),
                    VolumeContext(pool=BlockingPool(reactor, 1), reactor=reactor))
    argv = vol.helper_argv()
    assert argv[:3] == [sys.executable, "-m", "backends.xfs.helper"]
    pairs = dict(zip(argv[3::1], argv[4::1], strict=False))
    assert pairs["--socket"] == "/run/x.sock" and pairs["--mount"] == str(tmp_path.resolve())
    assert (pairs["--projects"], pairs["--projid"], pairs["--limits"], pairs["--lock"]) == ("/p", "/i", "/l", "/k")
    assert pairs["--xfs-quota"] == "/q"
    assert "--supervise" in argv and "--exit-with-parent" in argv
    uids = [argv[i + 1] for i, a in enumerate(argv) if a == "--allowed-uid"]
    assert uids[0] == "1234"  # the first one owns the socket
    assert vol.capabilities == frozenset({"vfolder", "quota"}) and vol.backend_name == "xfs"
