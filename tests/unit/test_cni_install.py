"""install_cni writes a runnable plugin binary and a conflist a runtime can use, atomically and repeatably."""

import json
import os
import stat
import subprocess
import sys

import pytest

from cni.install import SYSTEM_PYTHON, install_cni
from netplugin.errors import InvalidInput

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


@pytest.fixture
def dirs(tmp_path):
    return str(tmp_path / "opt-cni-bin"), str(tmp_path / "etc-cni-net.d")


def run_installed(binary, command, conf=None, **env):
    """Exec the installed file itself, so its shebang is what starts it."""
    environ = {"CNI_COMMAND": command, "CNI_PATH": os.path.dirname(binary), **env}
    proc = subprocess.run(
        [binary], env=environ, input=json.dumps(conf).encode() if conf else b"", capture_output=True, timeout=20
    )
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None


def plugin_config(conflist, index=0):
    """What a runtime passes on stdin for one plugin of a conflist (spec section 3, simplified)."""
    conf = dict(conflist["plugins"][index], cniVersion=conflist["cniVersion"], name=conflist["name"])
    conf.pop("capabilities", None)
    return conf


def test_install_writes_a_working_binary_and_conflist(dirs):
    bin_dir, conf_dir = dirs
    bin_path, conf_path = install_cni(
        bin_dir,
        conf_dir,
        network="podnet",
        agent_socket="/run/np-test/agent.sock",
        mtu=1450,
        pools=["10.244.0.0/16", "fd00:244::/64"],
    )

    assert bin_path == os.path.join(bin_dir, "netplugin")
    assert conf_path == os.path.join(conf_dir, "10-podnet.conflist")
    assert stat.S_IMODE(os.stat(bin_path).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(conf_path).st_mode) == 0o644
    with open(bin_path) as f:
        # the system's python3 (Debian's), not the venv running the tests: the plugin is stdlib-only
        assert f.readline() == f"#!{SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else sys.executable} -IS\n"
    with open(conf_path) as f:
        conflist = json.load(f)
    assert conflist == {
        "cniVersion": "1.0.0",  # the newest libcni 1.1 (Debian 12's runtimes) reads
        "name": "podnet",
        "plugins": [
            {
                "type": "netplugin",
                "agent_socket": "/run/np-test/agent.sock",
                "mtu": 1450,
                "ipam": {"pools": ["10.244.0.0/16", "fd00:244::/64"]},
                "capabilities": {"ips": True},
            }
        ],
    }

    assert run_installed(bin_path, "VERSION") == (0, {"cniVersion": "1.1.0", "supportedVersions": SUPPORTED})
    # the installed plugin reads the conflist's agent_socket: with no agent there, ADD says try again later
    status, out = run_installed(
        bin_path, "ADD", plugin_config(conflist), CNI_CONTAINERID="c1", CNI_NETNS="/run/netns/none", CNI_IFNAME="eth0"
    )
    assert status == 1 and out["code"] == 11
    assert "/run/np-test/agent.sock" in out["msg"]


def test_install_is_idempotent_and_leaves_no_temp_files(dirs):
    bin_dir, conf_dir = dirs
    first = install_cni(bin_dir, conf_dir)
    contents = [open(p, "rb").read() for p in first]
    second = install_cni(bin_dir, conf_dir)
    assert second == first
    assert [open(p, "rb").read() for p in second] == contents
    assert sorted(os.listdir(bin_dir)) == ["netplugin"]
    assert sorted(os.listdir(conf_dir)) == ["10-netplugin.conflist"]
    conflist = json.loads(contents[1])
    assert "ipam" not in conflist["plugins"][0]


def test_install_with_another_interpreter_and_cni_version(dirs):
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no /usr/bin/python3")
    bin_path, conf_path = install_cni(*dirs, python=python, cni_version="1.1.0", agent_socket="/run/np-test/a.sock")
    with open(bin_path) as f:
        assert f.readline() == "#!/usr/bin/python3 -IS\n"
    conflist = json.load(open(conf_path))
    assert conflist["cniVersion"] == "1.1.0"
    assert run_installed(bin_path, "VERSION")[0] == 0
    # 1.1.0 is what allows STATUS: with no agent at the conflist's socket, it says unavailable
    status, out = run_installed(bin_path, "STATUS", plugin_config(conflist))
    assert status == 1 and out["code"] == 50 and "/run/np-test/a.sock" in out["msg"]


@pytest.mark.parametrize(
    "pools, ipam",
    [
        (None, {"assign_ipv6": True}),
        (["10.244.0.0/16"], {"pools": ["10.244.0.0/16"], "assign_ipv6": True}),
    ],
)
def test_ipv6_writes_assign_ipv6(dirs, pools, ipam):
    """What the agent reads to give a container an IPv6 address as well (netplugin/agent/cni_api.py)."""
    _, conf_path = install_cni(*dirs, pools=pools, ipv6=True)
    assert json.load(open(conf_path))["plugins"][0]["ipam"] == ipam


@pytest.mark.parametrize(
    "kwargs",
    [
        {"network": "bad/name"},
        {"network": ""},
        {"agent_socket": "relative/agent.sock"},
        {"mtu": 0},
        {"mtu": "1500"},
        {"mtu": 575},  # the agent refuses less
        {"ipv6": "yes"},
        {"pools": ["10.244.0.1/16"]},
        {"pools": ["not-a-cidr"]},
        {"python": "python3"},
        {"python": "/nonexistent/python3"},
        {"cni_version": "0.2.0"},
    ],
)
def test_bad_input_is_refused_and_writes_nothing(dirs, kwargs):
    bin_dir, conf_dir = dirs
    with pytest.raises(InvalidInput):
        install_cni(bin_dir, conf_dir, **kwargs)
    assert not os.path.exists(bin_dir) and not os.path.exists(conf_dir)


def test_installed_plugin_loads_no_heavy_module_and_compiles_nothing(dirs):
    """Start-up is most of a VERSION and a large part of an ADD: the binary must not pay for json (re, enum),
    socket (enum, selectors) or compiling its own source on every run."""
    bin_path, conf_path = install_cni(*dirs, agent_socket="/run/np-test/agent.sock")
    conflist = json.load(open(conf_path))
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_PATH": dirs[0],
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/run/netns/none",
        "CNI_IFNAME": "eth0",
    }
    # -X importtime lists every module imported; the code runs as the shebang would run it (-IS)
    with open(bin_path) as f:
        interpreter = f.readline()[2:].split()[0]
    proc = subprocess.run(
        [interpreter, "-IS", "-X", "importtime", bin_path],
        env=env,
        capture_output=True,
        input=json.dumps(plugin_config(conflist)).encode(),
        timeout=20,
    )
    assert json.loads(proc.stdout)["code"] == 11
    imported = {line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines() if "|" in line}
    assert "_socket" in imported  # it did reach for the agent
    assert not imported & {"os", "json", "socket", "re", "enum", "http.client", "ipaddress"}
    with open(bin_path, "rb") as f:
        assert len(f.read().splitlines()) == 4  # shebang, comment, imports, the code object: no source to compile
