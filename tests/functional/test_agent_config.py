"""The agent's TOML config file: options from the file, flags overriding them, the etcd password from a file named
in it, and one clear line naming file:key for a mistake; ``--version`` of both programs; netctl's completion."""

import os
import subprocess

import pytest

from netplugin.config import EtcdConfig
from netplugin.datastore.client import Datastore
from netplugin.lab.agents import AgentProcess
from netplugin.lab.console import console_script
from tests.functional.test_secrets import auth_etcd  # noqa: F401 (fixture)

pytestmark = pytest.mark.functional


def test_agent_reads_its_config_file_and_flags_override_it(auth_etcd, namespaces, tmp_path):
    pw = tmp_path / "etcd-password"
    pw.write_text("pw-in-a-file\n")
    pw.chmod(0o600)
    ns = namespaces.add()
    auth_etcd.bridge_into(ns)
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'hostname = "from-the-file"\nmtu = 1400\n\n[etcd]\nendpoints = ["http://192.0.2.1:2379"]\n'
        f'user = "root"\npassword_file = "{pw}"\n\n[labels]\nrack = "r7"\nzone = "z2"\n'
    )
    # agent_argv passes --hostname and --etcd-endpoints: flags win over the file's values for those two.
    agent = AgentProcess(ns, ns, auth_etcd.endpoint, str(tmp_path / "run"), extra_args=["--config", str(conf)])
    try:
        agent.start()
        authed = Datastore(EtcdConfig(endpoints=[auth_etcd.endpoint], username="root", password="pw-in-a-file"))
        node = authed.get(f"/netplugin/v1/nodes/{ns}")
        assert node is not None, agent.log()  # registered under the flag's name, logged in with the file's password
        assert node.value["labels"] == {"rack": "r7", "zone": "z2"}, node.value
        assert authed.get("/netplugin/v1/nodes/from-the-file") is None
    finally:
        agent.stop()


@pytest.mark.parametrize(
    "text,line",
    [
        ('hostname = "h"\n[etcd]\npasswrd = "x"\n', "agent.toml:etcd.passwrd: unknown key"),
        ('hostname = "h"\nmtu = "big"\n', "agent.toml:mtu: must be a whole number, not 'big'"),
        ('hostname = "h"\nrouting = "ospf"\n', "agent.toml:routing: must be one of"),
        ('hostname = "h"\nresync_intervall = 5\n', "agent.toml:resync_intervall: unknown key"),
        ('hostname = "h"\n[labels]\nrack = 7\n', "agent.toml:labels: must be a table of strings"),
        ("hostname = \n", "agent.toml: not valid TOML"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key_and_exit_1(tmp_path, text, line):
    conf = tmp_path / "agent.toml"
    conf.write_text(text)
    p = subprocess.run(
        [console_script("netplugin"), "agent", "--config", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 1, p
    assert p.stderr.startswith("netplugin: error: ") and line in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr


def test_version_of_both_programs_comes_from_the_package_metadata():
    from importlib.metadata import version

    for prog in ("netplugin", "netctl"):
        p = subprocess.run([console_script(prog), "--version"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and p.stdout.strip() == f"{prog}, version {version('netplugin')}", p


def test_netctl_bash_completion_script_generates_and_completes():
    env = dict(os.environ, _NETCTL_COMPLETE="bash_source")
    p = subprocess.run([console_script("netctl")], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "_netctl_completion" in p.stdout and "complete " in p.stdout, p
    env = dict(os.environ, _NETCTL_COMPLETE="bash_complete", COMP_WORDS="netctl inst", COMP_CWORD="1")
    p = subprocess.run([console_script("netctl")], env=env, capture_output=True, text=True, timeout=30)
    assert "install-cni" in p.stdout, p
