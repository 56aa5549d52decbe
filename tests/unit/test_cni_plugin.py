"""The CNI plugin binary, run exactly as a runtime runs it (environment + stdin, a fresh interpreter with -IS),
against a small fake of our own agent served over HTTP/1.1 on a unix socket in a temp dir.

The fake records every request so the tests can check what the plugin forwarded; the real agent is exercised by
the functional tests.
"""

import http.server
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time

import pytest

PLUGIN = os.path.join(os.path.dirname(__file__), "..", "..", "cni", "plugin.py")
SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]

AGENT_RESULT = {
    "cniVersion": "1.1.0",
    "interfaces": [{"name": "eth0", "mac": "ee:ee:ee:ee:ee:01", "mtu": 1500, "sandbox": "/run/netns/x"}],
    "ips": [
        {"address": "10.1.0.5/32", "gateway": "169.254.1.1", "interface": 0},
        {"address": "fd00:1::5/128", "gateway": "fe80::1", "interface": 0},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1", "priority": 10}, {"dst": "::/0", "gw": "fe80::1"}],
    "dns": {},
}


class FakeAgent:
    """A stand-in for the netplugin agent's CNI endpoint. ``reply(request) -> (http status, body)`` decides
    each answer; ``requests`` holds every JSON body received."""

    def __init__(self, path):
        self.path = path
        self.requests = []
        self.reply = lambda request: (200, {"result": {}})
        self.server = None

    def start(self):
        agent = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # also makes http.server answer Expect: 100-continue

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                request = json.loads(self.rfile.read(length))
                request["_path"] = self.path
                agent.requests.append(request)
                status, body = agent.reply(request)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True
            block_on_close = False

        self.server = Server(self.path, Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    @property
    def last(self):
        return self.requests[-1]


@pytest.fixture
def sockdir():
    """A short temp dir for unix sockets (their paths must stay under 108 bytes)."""
    path = tempfile.mkdtemp(prefix="npcni-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(sockdir):
    fake = FakeAgent(os.path.join(sockdir, "agent.sock"))
    try:
        fake.start()
        yield fake
    finally:
        fake.close()


def netconf(version="1.1.0", **extra):
    conf = {"cniVersion": version, "name": "testnet", "type": "netplugin", "mtu": 1500}
    conf.update(extra)
    return conf


def run_plugin(command, conf=None, sock="/nonexistent/agent.sock", stdin=None, **env):
    """Run the plugin like a runtime: CNI_* in the environment, the config on stdin. Returns
    (exit status, parsed stdout or None, seconds taken)."""
    environ = {"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin", "NETPLUGIN_AGENT_SOCKET": sock}
    if command in ("ADD", "DEL", "CHECK"):
        environ.update(CNI_CONTAINERID="c0ffee-1", CNI_NETNS="/run/netns/x", CNI_IFNAME="eth0")
    for key, value in env.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    data = stdin if stdin is not None else (json.dumps(conf).encode() if conf is not None else b"")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-IS", PLUGIN], env=environ, input=data, capture_output=True, timeout=20)
    elapsed = time.monotonic() - start
    out = proc.stdout.decode()
    assert out.count("\n") <= 1, out  # one JSON document at most
    return proc.returncode, (json.loads(out) if out.strip() else None), elapsed


def assert_error(status, out, code, version="1.1.0"):
    assert status == 1, out
    assert out["code"] == code, out
    assert out["cniVersion"] == version
    assert isinstance(out["msg"], str) and out["msg"]


# ----------------------------------------------------------------------------------------------------- VERSION


def test_version_reports_supported_versions_and_ignores_stdin():
    status, out, _ = run_plugin("VERSION", stdin=b"this is not json")
    assert status == 0
    assert out == {"cniVersion": "1.1.0", "supportedVersions": SUPPORTED}


# --------------------------------------------------------------------------------------------------------- ADD


@pytest.mark.parametrize("version", SUPPORTED)
def test_add_result_has_the_shape_of_the_config_version(agent, version):
    agent.reply = lambda request: (200, {"result": AGENT_RESULT})
    status, out, _ = run_plugin("ADD", netconf(version), agent.path)

    assert status == 0, out
    assert out["cniVersion"] == version
    assert [i["name"] for i in out["interfaces"]] == ["eth0"]
    assert out["interfaces"][0]["sandbox"] == "/run/netns/x"
    assert [ip["address"] for ip in out["ips"]] == ["10.1.0.5/32", "fd00:1::5/128"]
    assert all(ip["interface"] == 0 for ip in out["ips"])
    assert out["dns"] == {}
    if version.startswith("0."):
        assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    else:
        assert all("version" not in ip for ip in out["ips"])
    if version == "1.1.0":  # fields 1.1.0 added survive only there
        assert out["interfaces"][0]["mtu"] == 1500
        assert out["routes"][0] == {"dst": "0.0.0.0/0", "gw": "169.254.1.1", "priority": 10}
    else:
        assert "mtu" not in out["interfaces"][0]
        assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"}]


def test_add_forwards_the_invocation_to_the_agent(agent):
    agent.reply = lambda request: (200, {"result": AGENT_RESULT})
    conf = netconf(agent_socket="/ignored/because/env/overrides")
    status, out, _ = run_plugin("ADD", conf, agent.path, CNI_ARGS="IgnoreUnknown=1;FOO=bar")

    assert status == 0, out
    request = agent.last
    assert request["_path"] == "/v1/cni"
    assert request["command"] == "ADD"
    assert request["container_id"] == "c0ffee-1"
    assert request["netns"] == "/run/netns/x"
    assert request["ifname"] == "eth0"
    assert request["args"] == {"IgnoreUnknown": "1", "FOO": "bar"}
    assert request["config"] == conf
    assert request["ips"] == [] and request["labels"] == {} and request["prev_result"] is None


@pytest.mark.parametrize("version", ["0.4.0", "1.1.0"])
def test_add_appends_to_an_earlier_plugins_result(agent, version):
    """Chaining: our interface, addresses and routes follow the previous plugin's, indexes re-pointed."""
    agent.reply = lambda request: (200, {"result": AGENT_RESULT})
    prev = {
        "cniVersion": version,
        "interfaces": [
            {"name": "br0", "mac": "aa:aa:aa:aa:aa:01"},
            {"name": "net1", "mac": "aa:aa:aa:aa:aa:02", "sandbox": "/run/netns/x"},
        ],
        "ips": [{"address": "192.168.9.2/24", "gateway": "192.168.9.1", "interface": 1}],
        "routes": [{"dst": "192.168.0.0/16"}],
        "dns": {"nameservers": ["192.168.9.1"]},
    }
    if version == "0.4.0":
        prev["ips"][0]["version"] = "4"
    status, out, _ = run_plugin("ADD", netconf(version, prevResult=prev), agent.path)

    assert status == 0, out
    assert [i["name"] for i in out["interfaces"]] == ["br0", "net1", "eth0"]
    assert [(ip["address"], ip["interface"]) for ip in out["ips"]] == [
        ("192.168.9.2/24", 1),
        ("10.1.0.5/32", 2),
        ("fd00:1::5/128", 2),
    ]
    assert [r["dst"] for r in out["routes"]] == ["192.168.0.0/16", "0.0.0.0/0", "::/0"]
    assert out["dns"] == {"nameservers": ["192.168.9.1"]}
    if version == "0.4.0":
        assert [ip["version"] for ip in out["ips"]] == ["4", "4", "6"]
    # the agent gets the earlier result in one (1.1.0) shape whatever the config version
    assert agent.last["prev_result"]["ips"] == [{"address": "192.168.9.2/24", "gateway": "192.168.9.1", "interface": 1}]


def test_add_rejects_a_prev_result_pointing_at_a_missing_interface(agent):
    prev = {"cniVersion": "1.0.0", "interfaces": [], "ips": [{"address": "10.9.9.9/32", "interface": 3}]}
    status, out, _ = run_plugin("ADD", netconf("1.0.0", prevResult=prev), agent.path)
    assert_error(status, out, 7, "1.0.0")
    assert agent.requests == []


def test_add_passes_agent_errors_through(agent):
    agent.reply = lambda request: (
        500,
        {"error": {"code": 100, "msg": "pool exhausted", "details": "no free address in 10.1.0.0/16"}},
    )
    status, out, _ = run_plugin("ADD", netconf("1.0.0"), agent.path)
    assert status == 1
    assert out == {
        "cniVersion": "1.0.0",
        "code": 100,
        "msg": "pool exhausted",
        "details": "no free address in 10.1.0.0/16",
    }


def test_add_refuses_a_malformed_agent_result(agent):
    bad = dict(AGENT_RESULT, ips=[{"address": "10.1.0.5/32", "interface": 4}])
    agent.reply = lambda request: (200, {"result": bad})
    status, out, _ = run_plugin("ADD", netconf(), agent.path)
    assert_error(status, out, 999)
    assert "interface 4" in out["msg"]


def test_add_reports_an_agent_that_does_not_speak_our_protocol(agent):
    agent.reply = lambda request: (404, b"<html>not found</html>")
    status, out, _ = run_plugin("ADD", netconf(), agent.path)
    assert_error(status, out, 999)
    assert "HTTP 404" in out["msg"]


# ------------------------------------------------------------------------------------------ addresses, labels


def test_ip_from_cni_args_is_forwarded(agent):
    agent.reply = lambda request: (200, {"result": AGENT_RESULT})
    status, out, _ = run_plugin("ADD", netconf(), agent.path, CNI_ARGS="IgnoreUnknown=1;IP=10.1.0.9")
    assert status == 0, out
    assert agent.last["ips"] == ["10.1.0.9"]
    assert agent.last["args"]["IP"] == "10.1.0.9"


def test_runtime_config_ips_are_forwarded_and_win_over_cni_args(agent):
    agent.reply = lambda request: (200, {"result": AGENT_RESULT})
    conf = netconf(runtimeConfig={"ips": ["10.1.0.7/16", "fd00:1::7"]})
    status, out, _ = run_plugin("ADD", conf, agent.path, CNI_ARGS="IP=10.1.0.9")
    assert status == 0, out
    assert agent.last["ips"] == ["10.1.0.7/16", "fd00:1::7"]
    assert agent.last["config"]["runtimeConfig"] == {"ips": ["10.1.0.7/16", "fd00:1::7"]}


def test_args_cni_ips_are_forwarded(agent):
    agent.reply = lambda request: (200, {"result": AGENT_RESULT})
    status, out, _ = run_plugin("ADD", netconf(args={"cni": {"ips": ["10.1.0.8"]}}), agent.path)
    assert status == 0, out
    assert agent.last["ips"] == ["10.1.0.8"]


@pytest.mark.parametrize("where, code", [("CNI_ARGS", 4), ("runtimeConfig", 7)])
def test_a_malformed_requested_address_is_refused_before_the_agent(agent, where, code):
    if where == "CNI_ARGS":
        status, out, _ = run_plugin("ADD", netconf(), agent.path, CNI_ARGS="IP=10.1.0.999")
    else:
        status, out, _ = run_plugin("ADD", netconf(runtimeConfig={"ips": ["not-an-ip"]}), agent.path)
    assert_error(status, out, code)
    assert agent.requests == []


def test_labels_from_kubernetes_args_and_config_are_forwarded(agent):
    agent.reply = lambda request: (200, {"result": AGENT_RESULT})
    conf = netconf(
        args={
            "labels": {"app": "web", "tier": "front"},
            "cni": {"labels": [{"key": "team", "value": "blue"}, {"key": "tier", "value": "edge"}]},
        }
    )
    status, out, _ = run_plugin(
        "ADD", conf, agent.path, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p1"
    )
    assert status == 0, out
    assert agent.last["labels"] == {
        "app": "web",
        "tier": "edge",
        "team": "blue",
        "netplugin.io/namespace": "ns1",
        "netplugin.io/pod": "p1",
    }
    assert agent.last["args"]["K8S_POD_NAMESPACE"] == "ns1"


def test_malformed_labels_are_refused(agent):
    status, out, _ = run_plugin("ADD", netconf(args={"labels": {"app": 3}}), agent.path)
    assert_error(status, out, 7)
    assert agent.requests == []


def mesos_args(labels):
    """args as Mesos' network/cni isolator writes them: the task's NetworkInfo protobuf as JSON."""
    return {
        "org.apache.mesos": {
            "network_info": {
                "name": "testnet",
                "labels": labels,
                "port_mappings": [{"host_port": 8080, "container_port": 80}],
            }
        }
    }


def test_mesos_network_labels_are_forwarded(agent):
    agent.reply = lambda request: (200, {"result": AGENT_RESULT})
    labels = {"labels": [{"key": "app", "value": "api"}, {"key": "env", "value": "prod"}, {"key": "canary"}]}
    status, out, _ = run_plugin("ADD", netconf(args=mesos_args(labels)), agent.path)
    assert status == 0, out
    assert agent.last["labels"] == {"app": "api", "env": "prod", "canary": ""}  # Label.value is optional


@pytest.mark.parametrize(
    "mesos",
    [
        "x",  # org.apache.mesos not an object
        {"network_info": []},  # network_info not an object
        {"network_info": {"labels": [{"key": "a", "value": "b"}]}},  # labels not wrapped in {"labels": [...]}
        {"network_info": {"labels": {"labels": {"key": "a"}}}},  # labels.labels not a list
        {"network_info": {"labels": {"labels": [{"value": "b"}]}}},  # no key
        {"network_info": {"labels": {"labels": [{"key": 7, "value": "b"}]}}},
        {"network_info": {"labels": {"labels": [{"key": "a", "value": 1}]}}},
        {"network_info": {"labels": {"labels": [{"key": "a", "value": "b", "x": 1}]}}},
    ],
)
def test_malformed_mesos_labels_are_refused_before_the_agent(agent, mesos):
    status, out, _ = run_plugin("ADD", netconf(args={"org.apache.mesos": mesos}), agent.path)
    assert_error(status, out, 7)
    assert "org.apache.mesos" in out["msg"], out
    assert agent.requests == []


def test_del_of_a_config_with_malformed_labels_still_reaches_the_agent(agent):
    """A runtime DELs after a refused ADD with the same config: that DEL must clean up, not fail again."""
    status, out, _ = run_plugin("DEL", netconf(args={"labels": 3, **mesos_args({"labels": "junk"})}), agent.path)
    assert status == 0, out
    assert agent.last["command"] == "DEL"


# ------------------------------------------------------------------------------- what the fuzzer found (tests/faults)


@pytest.mark.parametrize(
    "stdin",
    [
        b"\xef\xbb\xbf" + json.dumps(netconf()).encode(),  # a BOM: Go's encoding/json refuses it too
        json.dumps(netconf(name="n\udc80"), ensure_ascii=False).encode("utf-8", "surrogatepass"),  # CESU surrogate
        json.dumps(netconf()).encode("utf-16"),  # json.loads(bytes) would take UTF-16
        b'{"a": ' * 100000 + b"1" + b"}" * 100000,  # deeper than the parser's stack
    ],
)
def test_stdin_that_is_not_strict_utf8_json_is_a_decode_error(agent, stdin):
    status, out, _ = run_plugin("ADD", sock=agent.path, stdin=stdin)
    assert_error(status, out, 6)
    assert agent.requests == []


@pytest.mark.parametrize("name", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"])
def test_environment_that_is_not_utf8_is_refused(agent, name):
    environ = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/run/netns/x",
        "CNI_IFNAME": "eth0",
        "NETPLUGIN_AGENT_SOCKET": agent.path,
    }
    env = {k.encode(): v.encode() for k, v in environ.items()}
    env[name.encode()] = b"K=\xff" if name == "CNI_ARGS" else b"a\xff"
    proc = subprocess.run(
        [sys.executable, "-IS", PLUGIN], env=env, input=json.dumps(netconf()).encode(), capture_output=True, timeout=20
    )
    out = json.loads(proc.stdout)
    assert_error(proc.returncode, out, 4)
    assert name in out["msg"] and proc.stderr == b""
    assert agent.requests == []


@pytest.mark.parametrize("netns", ["netns/x", "/" + "n" * 5000])
def test_a_netns_that_is_no_absolute_path_is_refused_but_del_still_cleans_up(agent, netns):
    status, out, _ = run_plugin("ADD", netconf(), agent.path, CNI_NETNS=netns)
    assert_error(status, out, 4)
    assert "CNI_NETNS" in out["msg"] and agent.requests == []
    status, out, _ = run_plugin("DEL", netconf(), agent.path, CNI_NETNS=netns)
    assert status == 0 and agent.last["command"] == "DEL" and agent.last["netns"] == ""


def test_a_config_nested_too_deeply_for_the_agent_request_is_refused(agent):
    deep = b'{"a": ' * 990 + b"1" + b"}" * 990  # json.loads takes it; json.dumps of the request would not
    status, out, _ = run_plugin(
        "ADD", sock=agent.path, stdin=json.dumps(netconf()).encode()[:-1] + b', "x": ' + deep + b"}"
    )
    assert_error(status, out, 7)
    assert "nested deeper" in out["msg"] and agent.requests == []


@pytest.mark.parametrize("command", ["STATUS", "GC"])
def test_status_and_gc_ignore_the_container_variables(agent, command):
    conf = netconf(**{"cni.dev/valid-attachments": []})
    status, out, _ = run_plugin(
        command, conf, agent.path, CNI_CONTAINERID="a b", CNI_NETNS="rel", CNI_IFNAME="..", CNI_ARGS="junk"
    )
    assert status == 0, out
    assert agent.last["command"] == command


def test_ifname_length_counts_bytes(agent):
    status, out, _ = run_plugin("ADD", netconf(), agent.path, CNI_IFNAME="é" * 8)  # 8 characters, 16 bytes
    assert_error(status, out, 4)
    assert "16 bytes" in out["msg"]


def test_huge_input_is_quoted_short_in_errors(agent):
    status, out, _ = run_plugin("ADD", netconf(), "/" + "z" * 100000, CNI_CONTAINERID="c1")
    assert_error(status, out, 11)
    assert len(out["msg"]) < 400, out["msg"][:500]
    status, out, _ = run_plugin("ADD", netconf(cniVersion="9" * 100000), agent.path)
    assert_error(status, out, 1)
    assert len(out["msg"]) < 400


# ----------------------------------------------------------------------------------------------- CHECK, DEL


def test_check_is_refused_for_configs_older_than_0_4_0(agent):
    prev = {"cniVersion": "0.3.1", "interfaces": [{"name": "eth0"}], "ips": []}
    status, out, _ = run_plugin("CHECK", netconf("0.3.1", prevResult=prev), agent.path)
    assert_error(status, out, 1, "0.3.1")
    assert "CHECK" in out["msg"]
    assert agent.requests == []


def test_check_forwards_the_prev_result(agent):
    prev = {
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
        "ips": [{"version": "4", "address": "10.1.0.5/32", "interface": 0}],
    }
    status, out, _ = run_plugin("CHECK", netconf("0.4.0", prevResult=prev), agent.path)
    assert (status, out) == (0, None)
    assert agent.last["command"] == "CHECK"
    assert agent.last["prev_result"]["ips"] == [{"address": "10.1.0.5/32", "interface": 0}]


def test_check_without_prev_result_is_an_invalid_config(agent):
    status, out, _ = run_plugin("CHECK", netconf(), agent.path)
    assert_error(status, out, 7)


def test_check_passes_the_agents_verdict_through(agent):
    agent.reply = lambda request: (200, {"error": {"code": 104, "msg": "route to 10.1.0.5 missing on host"}})
    prev = {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}], "ips": []}
    status, out, _ = run_plugin("CHECK", netconf(prevResult=prev), agent.path)
    assert_error(status, out, 104)


def test_del_succeeds_when_the_agent_does_not_know_the_container(agent):
    agent.reply = lambda request: (404, {"error": {"code": 3, "msg": "unknown container c0ffee-1"}})
    status, out, _ = run_plugin("DEL", netconf(), agent.path)
    assert (status, out) == (0, None)
    assert agent.last["command"] == "DEL"


def test_del_without_netns_is_forwarded(agent):
    status, out, _ = run_plugin("DEL", netconf("0.3.1"), agent.path, CNI_NETNS=None)
    assert (status, out) == (0, None)
    assert agent.last["netns"] == ""


def test_del_reports_other_agent_errors(agent):
    agent.reply = lambda request: (503, {"error": {"code": 11, "msg": "etcd unavailable"}})
    status, out, _ = run_plugin("DEL", netconf(), agent.path)
    assert_error(status, out, 11)


# ---------------------------------------------------------------------------------------------- STATUS, GC


def test_status_ok_prints_nothing(agent):
    status, out, _ = run_plugin("STATUS", netconf(), agent.path)
    assert (status, out) == (0, None)
    assert agent.last["command"] == "STATUS"
    assert agent.last["container_id"] == ""


def test_status_passes_unavailability_through(agent):
    agent.reply = lambda request: (200, {"error": {"code": 50, "msg": "etcd unreachable"}})
    status, out, _ = run_plugin("STATUS", netconf(), agent.path)
    assert_error(status, out, 50)


def test_status_without_agent_is_plugin_unavailable(sockdir):
    status, out, elapsed = run_plugin("STATUS", netconf(), os.path.join(sockdir, "none.sock"))
    assert_error(status, out, 50)
    assert elapsed < 2


def test_status_needs_a_1_1_0_config(agent):
    status, out, _ = run_plugin("STATUS", netconf("1.0.0"), agent.path)
    assert_error(status, out, 1, "1.0.0")


def test_gc_passes_valid_attachments_through(agent):
    attachments = [{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c2", "ifname": "net1"}]
    conf = netconf(**{"cni.dev/valid-attachments": attachments})
    status, out, _ = run_plugin("GC", conf, agent.path)
    assert (status, out) == (0, None)
    assert agent.last["command"] == "GC"
    assert agent.last["valid_attachments"] == attachments
    assert agent.last["config"]["cni.dev/valid-attachments"] == attachments


def test_gc_without_valid_attachments_is_refused_rather_than_collecting_everything(agent):
    status, out, _ = run_plugin("GC", netconf(), agent.path)
    assert_error(status, out, 7)
    assert agent.requests == []


def test_gc_needs_a_1_1_0_config(agent):
    status, out, _ = run_plugin("GC", netconf("1.0.0", **{"cni.dev/valid-attachments": []}), agent.path)
    assert_error(status, out, 1, "1.0.0")


# ------------------------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize("stdin", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_undecodable_config_is_code_6(agent, stdin):
    status, out, _ = run_plugin("ADD", stdin=stdin, sock=agent.path)
    assert_error(status, out, 6)
    assert agent.requests == []


@pytest.mark.parametrize("missing", ["CNI_NETNS", "CNI_CONTAINERID", "CNI_IFNAME"])
def test_add_without_required_env_is_code_4(agent, missing):
    status, out, _ = run_plugin("ADD", netconf(), agent.path, **{missing: None})
    assert_error(status, out, 4)
    assert missing in out["msg"]
    assert agent.requests == []


@pytest.mark.parametrize("command", ["", "FROB", "add"])
def test_unknown_or_missing_command_is_code_4(command):
    status, out, _ = run_plugin(command, netconf())
    assert_error(status, out, 4)


@pytest.mark.parametrize(
    "env",
    [
        {"CNI_CONTAINERID": "-bad"},
        {"CNI_CONTAINERID": "a b"},
        {"CNI_IFNAME": "much-too-long-ifname"},
        {"CNI_IFNAME": "eth:0"},
        {"CNI_IFNAME": ".."},
        {"CNI_ARGS": "IgnoreUnknown=1;garbage"},
    ],
)
def test_invalid_env_values_are_code_4(agent, env):
    status, out, _ = run_plugin("ADD", netconf(), agent.path, **env)
    assert_error(status, out, 4)
    assert agent.requests == []


@pytest.mark.parametrize("drop, code", [("name", 7), ("type", 7), ("cniVersion", 1)])
def test_missing_required_config_fields(agent, drop, code):
    conf = netconf("1.0.0")
    del conf[drop]
    status, out, _ = run_plugin("ADD", conf, agent.path)
    assert status == 1 and out["code"] == code, out
    assert agent.requests == []


def test_invalid_network_name_is_code_7(agent):
    status, out, _ = run_plugin("ADD", netconf(name="bad/name"), agent.path)
    assert_error(status, out, 7)


@pytest.mark.parametrize("version", ["0.2.0", "0.1.0", "1.2.0", "2.0.0", "latest"])
def test_unsupported_version_is_code_1(agent, version):
    status, out, _ = run_plugin("ADD", netconf(version), agent.path)
    assert_error(status, out, 1)
    assert version in out["msg"]
    assert agent.requests == []


def test_foreign_ipam_type_is_an_unsupported_field(agent):
    status, out, _ = run_plugin("ADD", netconf(ipam={"type": "host-local", "subnet": "10.9.0.0/24"}), agent.path)
    assert_error(status, out, 2)
    assert "ipam.type" in out["msg"] and "host-local" in out["msg"]


@pytest.mark.parametrize("timeout", [0, -1, "soon", True])
def test_invalid_agent_timeout_is_code_7(agent, timeout):
    status, out, _ = run_plugin("ADD", netconf(agent_timeout=timeout), agent.path)
    assert_error(status, out, 7)


# ------------------------------------------------------------------------------------------ agent unreachable


def test_agent_socket_missing_is_try_again_later(sockdir):
    path = os.path.join(sockdir, "missing.sock")
    status, out, elapsed = run_plugin("ADD", netconf(), path)
    assert_error(status, out, 11)
    assert path in out["msg"]
    assert elapsed < 2


def test_agent_socket_from_config_is_used_without_the_env_override(sockdir):
    path = os.path.join(sockdir, "from-config.sock")
    status, out, _ = run_plugin("DEL", netconf(agent_socket=path), NETPLUGIN_AGENT_SOCKET=None)
    assert_error(status, out, 11)
    assert path in out["msg"]


def test_agent_refusing_connections_is_try_again_later(sockdir):
    path = os.path.join(sockdir, "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: ECONNREFUSED
    status, out, elapsed = run_plugin("ADD", netconf(), path)
    assert_error(status, out, 11)
    assert elapsed < 2


def test_agent_that_never_accepts_is_try_again_later_within_two_seconds(sockdir):
    path = os.path.join(sockdir, "hung.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(8)  # connect() succeeds into the backlog, but nobody ever accepts or answers
        status, out, elapsed = run_plugin("ADD", netconf(), path)
    finally:
        listener.close()
    assert_error(status, out, 11)
    assert path in out["msg"]
    assert elapsed < 2


def test_connected_agent_that_never_answers_times_out_with_try_again_later(agent):
    release = threading.Event()
    agent.reply = lambda request: (release.wait(5), (200, {"result": AGENT_RESULT}))[1]
    try:
        status, out, elapsed = run_plugin("ADD", netconf(agent_timeout=0.5), agent.path)
    finally:
        release.set()
    assert_error(status, out, 11)
    assert "0.5 s" in out["msg"]
    assert elapsed < 3
    assert agent.last["command"] == "ADD"  # it did get the request: the 100-continue handshake succeeded


def test_plugin_talks_to_a_waitress_served_flask_app(sockdir):
    """The agent's likely HTTP stack: waitress must answer our Expect: 100-continue and Flask parse the body."""
    flask = pytest.importorskip("flask")
    waitress = pytest.importorskip("waitress")
    received = []
    app = flask.Flask("fake-agent")

    @app.post("/v1/cni")
    def cni():
        received.append(flask.request.get_json())
        return {"result": AGENT_RESULT}

    path = os.path.join(sockdir, "waitress.sock")
    server = waitress.create_server(app, unix_socket=path, threads=1)
    thread = threading.Thread(target=server.run, daemon=True)
    try:
        thread.start()
        status, out, _ = run_plugin("ADD", netconf("0.3.1"), path)
    finally:
        server.close()
        thread.join(5)
    assert status == 0, out
    assert out["ips"][0] == {"version": "4", "address": "10.1.0.5/32", "gateway": "169.254.1.1", "interface": 0}
    assert received[0]["container_id"] == "c0ffee-1"


@pytest.mark.parametrize(
    "text",
    [
        '{"a": [1, 2.5, -0.0, 1e400, NaN, -Infinity, "\\u00e9\\ud800", null, true, false, {}]}',
        ' \t\n{"a": 1}\r\n',
        '"x"',
        "[]",
        "",
        " ",
        "{",
        '{"a": }',
        "[1,",
        '{"a" 1}',
        "1 2",
        "nul",
        '"\x01"',
        "\x0c{}",
        '{"a": 1}}',
        "[" * 5000 + "]" * 5000,
    ],
)
def test_json_loads_agrees_with_the_json_module_on_values_and_errors(text):
    from cni import plugin

    def outcome(fn):
        try:
            return "ok", json.dumps(fn(text))  # dumps: NaN compares unequal to itself
        except RecursionError:
            return "recursion", ""
        except ValueError as e:
            return type(e).__name__, str(e)

    assert outcome(plugin.json_loads) == outcome(json.loads)


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, 2.5, float("nan"), float("-inf"), "é\u2028", None, True, {"b": {}}], "c": ""},
        [],
        "x",
        {1: 2},
    ],
)
def test_json_dumps_writes_what_the_json_module_writes(value):
    from cni import plugin

    assert plugin.json_dumps(value) == json.dumps(value)


def test_json_dumps_refuses_what_json_refuses():
    from cni import plugin

    for value in ({"a": object()}, {(1, 2): 3}):
        with pytest.raises(TypeError):
            plugin.json_dumps(value)
        with pytest.raises(TypeError):
            json.dumps(value)


def test_environment_is_what_os_environ_holds_undecodable_bytes_included():
    code = "import os, sys; sys.path.insert(0, sys.argv[1]); from cni import plugin; print(plugin.environment() == dict(os.environ))"
    env = {b"CNI_CONTAINERID": b"c\xff\xfe1", b"PATH": b"/usr/bin:/bin", b"X\xe9": b"caf\xc3\xa9"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-IS", "-c", code, root], env=env, capture_output=True, timeout=20)
    assert proc.stdout == b"True\n", proc.stderr
