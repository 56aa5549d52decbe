"""Pure parts of install: the default config file parses back into the agent's options, the unit's ordering, the
nf_tables emptiness test uninstall relies on before deleting a table."""

import json
import tomllib

import pytest

from netplugin.agent.config_file import default_map, render_default
from netplugin.agent.main import agent
from netplugin.errors import InvalidInput
from netplugin.install.systemd import render_unit
from netplugin.kernel.netfilter import nft_table_is_empty


def test_the_default_config_file_is_valid_toml_for_the_agent_and_holds_no_password():
    etcd = {
        "endpoints": ["http://10.0.0.1:2379", "http://10.0.0.2:2379"],
        "user": "np",
        "password_file": "/etc/netplugin/etcd-password",
        "password": "never-written",
    }
    text = render_default('odd"host\\name', etcd, docker_socket="/run/docker/plugins/netplugin.sock")
    assert "never-written" not in text
    got = default_map(agent, tomllib.loads(text), "agent.toml")
    assert got == {
        "hostname": 'odd"host\\name',
        "run_dir": "/run/netplugin",
        "docker_socket": "/run/docker/plugins/netplugin.sock",
        "etcd_endpoints": "http://10.0.0.1:2379,http://10.0.0.2:2379",
        "etcd_user": "np",
        "etcd_password_file": "/etc/netplugin/etcd-password",
        "labels": [],
    }


@pytest.mark.parametrize(
    "doc,where",
    [
        ({"etcd": "http://x"}, "f.toml:etcd: must be a table"),
        ({"mtu": True}, "f.toml:mtu: must be a whole number"),
        ({"reclaim_grace": "10"}, "f.toml:reclaim_grace: must be a number"),
        ({"etcd": {"endpoints": []}}, "f.toml:etcd.endpoints: must be a URL or a list of URLs"),
        ({"config": "other.toml"}, "f.toml:config: unknown key"),
    ],
)
def test_config_file_mistakes_name_file_and_key(doc, where):
    with pytest.raises(InvalidInput, match=where.replace(".", r"\.")):
        default_map(agent, doc, "f.toml")


def test_every_agent_option_has_a_config_key():
    import click
    from netplugin.agent.config_file import file_key

    sample = {click.INT: 7, click.FLOAT: 1.5}
    doc = {}
    for p in agent.params:
        if p.name == "config":
            continue
        table, key = file_key(p)
        value = (
            {"x": "y"}
            if p.name == "labels"
            else (p.type.choices[0] if isinstance(p.type, click.Choice) else sample.get(p.type, "http://a:1"))
        )
        (doc.setdefault(table, {}) if table else doc)[key] = value
    assert set(default_map(agent, doc, "f")) == {p.name for p in agent.params} - {"config"}


def test_unit_is_ordered_before_docker_and_restarts_on_failure():
    unit = render_unit("/usr/local/bin/netplugin", "/etc/netplugin/agent.toml")
    assert "\nBefore=docker.service\n" in unit and "\nRestart=on-failure\n" in unit
    assert "\nExecStart=/usr/local/bin/netplugin agent --config /etc/netplugin/agent.toml\n" in unit


def test_nft_table_is_empty_only_without_rules_user_chains_or_drop_policies():
    base = [
        {"metainfo": {}},
        {"table": {"family": "ip6", "name": "filter"}},
        {"chain": {"name": "INPUT", "hook": "input", "policy": "accept"}},
    ]
    assert nft_table_is_empty(json.dumps({"nftables": base}))
    for extra in (
        {"rule": {"chain": "INPUT"}},
        {"chain": {"name": "OTHER"}},
        {"set": {"name": "s"}},
        {"chain": {"name": "FORWARD", "hook": "forward", "policy": "drop"}},
    ):
        assert not nft_table_is_empty(json.dumps({"nftables": base + [extra]})), extra
    assert not nft_table_is_empty("not json")
