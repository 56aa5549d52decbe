"""Fuzzing the CNI plugin against a live agent (real etcd, real namespaces, real veths).

Hypothesis generates invocations as a runtime (or a broken one) might make them: valid configs for every
command, then mutated (keys dropped or replaced by junk of any JSON type, huge strings, nested junk), stdin that is
not JSON, not UTF-8 or not an object, and an environment with variables missing, empty, huge, non-UTF-8 or
malformed. Every answer must be the spec's: exit status 0 with a result of the config's version, or 1 with one
JSON error object whose code says what kind of failure it was (4 environment, 6 decoding, 1 version, 7 config,
11 try again ...), never 999 (our own bug) and never a traceback. Pristine input must succeed. Whatever an ADD
created is DELed at once, as a runtime would; at the end the agent still answers, ``netctl ipam check`` is
clean, and no veth, route, endpoint or handle is left.

``test_fuzz_in_process`` runs the plugin's code in this interpreter (``cni.plugin.run``, the installed binary's
own text) ``fuzz_examples`` times; ``test_fuzz_installed_binary`` execs the installed binary (about 30 ms a call
more) a tenth as often, at least 200 times. The default is a short run; ``NETPLUGIN_FUZZ_EXAMPLES=10000`` is the
long one (10,000 in-process calls and 1,000 execs).
"""

import contextlib
import copy
import io
import json
import os
import socket
import subprocess
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroute2 import NetNS

from cni import plugin
from netplugin.datastore import keys
from netplugin.lab.agents import rmtree, tempdir
from netplugin.lab.console import console_script
from tests.functional.test_cni_e2e import NETWORK, host  # noqa: F401 - the live agent of test_cni_e2e
from netplugin.lab.netns import NamespaceSet, nsexec
from tests.waiting import poll, wait_until

pytestmark = [pytest.mark.functional, pytest.mark.timeout(3600)]

IN_PROCESS_FACTOR = 10
ERROR_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 100, 101, 102, 103, 104}  # never 999: that is a bug of ours
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC")

# --- what is generated -----------------------------------------------------------------------------------------

huge_text = st.builds(
    lambda s, n: s * n, st.sampled_from(["x", "é", "/", "💥", "\x00", "a.b-", "\\u0000"]), st.integers(300, 70000)
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=24), huge_text
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
odd_env = st.one_of(
    st.just(""),
    st.text(max_size=30).filter(lambda t: "\x00" not in t),
    st.binary(min_size=1, max_size=30).filter(lambda b: b"\x00" not in b),
    st.builds(lambda n: "z" * n, st.integers(16, 5000)),
)


def _paths(node, depth=0):
    """Every (container, key) in a nested config, for picking what to mutate."""
    if depth > 4:
        return
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield node, key
        yield from _paths(value, depth + 1)


@st.composite
def mutated(draw, conf):
    """``conf`` with 1-3 changes: a key dropped, a value replaced by junk, or a junk key added."""
    conf = copy.deepcopy(conf)
    for _ in range(draw(st.integers(1, 3))):
        targets = list(_paths(conf))
        op = draw(st.sampled_from(["drop", "replace", "insert"]))
        if op == "insert" or not targets:
            parents = [conf] + [v for p, k in targets for v in [p[k]] if isinstance(v, dict)]
            draw(st.sampled_from(parents))[draw(st.text(max_size=12))] = draw(junk)
            continue
        parent, key = draw(st.sampled_from(targets))
        if op == "drop":
            del parent[key]
        else:
            parent[key] = draw(junk)
    return conf


@st.composite
def stdin_of(draw, conf):
    """(bytes, decodes?): mostly the config as JSON; sometimes bytes that are no JSON object at all. "Decodes"
    is True, False (the answer must be code 6) or None (either is right: a parser's depth or digit limit)."""
    text = json.dumps(conf).encode()
    how = draw(
        st.sampled_from(
            ["json"] * 6
            + ["truncated", "non-utf8", "list", "scalar", "empty", "binary", "bom", "padded", "deep", "bignum"]
        )
    )
    if how == "json":
        return text, True
    if how == "padded":
        return b" \n\t" + text + b"\n ", True
    if how == "truncated":
        return text[: draw(st.integers(0, len(text) - 1))], False
    if how == "non-utf8":
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + text[cut:], False
    if how == "deep":  # nested objects under a junk key: valid JSON, deeper than any parser's stack
        depth = draw(st.sampled_from([40, 200, 900, 990, 5000, 100000]))
        return (
            text[:-1] + b', "deep": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}",
            True if depth <= 40 else None if depth < 1000 else False,
        )  # 7 over plugin.MAX_DEPTH, or 6
    if how == "bignum":  # an integer of more digits than Python converts by default
        return text[:-1] + b', "n": ' + b"7" * draw(st.sampled_from([4300, 4301, 100000])) + b"}", None
    if how == "list":
        return b"[" + text + b"]", False
    if how == "scalar":
        return json.dumps(draw(scalars)).encode(), False
    if how == "empty":
        return draw(st.sampled_from([b"", b"   ", b"\n"])), False
    if how == "bom":
        return b"\xef\xbb\xbf" + text, False  # as in Go's encoding/json, which runtimes use: no BOM
    data = draw(st.binary(max_size=200))
    return data, False


class Invocation:
    """One generated call: environment (str or bytes values), stdin, and what we know about its validity."""

    def __init__(self, env, stdin, conf, command, env_ok, stdin_ok, conf_ok):
        self.env, self.stdin, self.conf, self.command = env, stdin, conf, command
        self.env_ok, self.stdin_ok, self.conf_ok = env_ok, stdin_ok, conf_ok

    def __repr__(self):
        short = {
            k: (v[:60] + type(v)(b"..." if isinstance(v, bytes) else "...")) if len(v) > 60 else v
            for k, v in self.env.items()
        }
        return f"Invocation(env={short!r}, stdin={self.stdin[:300]!r}, ok={self.env_ok, self.stdin_ok, self.conf_ok})"


class Lab:
    """The live agent and what the fuzzer needs around it: a container namespace, a file and a directory
    that are no network namespace, and valid configs for every command."""

    def __init__(self, host, netns, scratch):
        self.host, self.netns, self.scratch = host, netns, scratch
        self.netns_path = f"/run/netns/{netns}"
        self.file = os.path.join(scratch, "not-a-netns")
        with open(self.file, "w") as f:
            f.write("x")
        self.counter = 0
        self.outcomes = Counter()
        self.samples = {}  # one message per outcome, for the summary
        self.log_offset = os.path.getsize(host.agent.log_path)
        self.rtnl_host, self.rtnl_container = NetNS(host.ns), NetNS(netns)
        base = dict(host.cni.config)
        prev = {
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "sandbox": self.netns_path}],
            "ips": [{"address": "10.70.0.9/32", "gateway": "169.254.1.1", "interface": 0}],
        }
        self.bases = {
            "ADD": [
                base,
                dict(base, cniVersion="0.3.1"),
                dict(base, cniVersion="1.0.0"),
                dict(base, args={"labels": {"app": "web"}, "cni": {"labels": [{"key": "tier", "value": "a"}]}}),
                dict(
                    base,
                    args={
                        "org.apache.mesos": {
                            "network_info": {"name": NETWORK, "labels": {"labels": [{"key": "task", "value": "api"}]}}
                        }
                    },
                ),
                dict(base, runtimeConfig={"ips": ["10.70.0.77"]}),
                dict(base, prevResult=prev),
            ],
            "DEL": [base, dict(base, cniVersion="0.4.0", prevResult=prev)],
            "CHECK": [dict(base, prevResult=prev)],
            "STATUS": [base],
            "GC": [dict(base, **{"cni.dev/valid-attachments": [{"containerID": "fz-keep", "ifname": "eth0"}]})],
        }

    def leftovers(self, settle=5.0):
        """Kernel objects an invocation left: np* veths on the host, interfaces besides lo in the container.
        Asked over netlink sockets kept open in both namespaces: an ``ip`` exec per example would double the
        cost of a run. DEL answers before the agent's worker deletes the veth pair
        (netplugin/dataplane/reaper.py), so a pair still there is asked again for up to ``settle`` s: a leak
        stays, a deletion in flight goes."""
        found = []

        def nothing_left():
            host = [link.get_attr("IFLA_IFNAME") for link in self.rtnl_host.get_links()]
            container = [link.get_attr("IFLA_IFNAME") for link in self.rtnl_container.get_links()]
            found[:] = [n for n in host if n.startswith("np")] + [n for n in container if n != "lo"]
            return not found

        poll(nothing_left, timeout=settle, step=0.01)
        return found

    def close(self):
        self.rtnl_host.close()
        self.rtnl_container.close()

    def strategy(self):
        @st.composite
        def invocations(draw):
            command = draw(st.sampled_from(("ADD", "ADD", "ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")))
            self.counter += 1
            conf = draw(st.sampled_from(self.bases.get(command, self.bases["STATUS"])))
            conf_ok = draw(st.booleans())
            if not conf_ok:
                conf = draw(mutated(conf))
            stdin, stdin_ok = draw(stdin_of(conf))
            env = {
                "CNI_COMMAND": command,
                "CNI_CONTAINERID": f"fz{self.counter}",
                "CNI_NETNS": self.netns_path,
                "CNI_IFNAME": "eth0",
                "CNI_PATH": self.host.cni.bin_dir,
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                plugin.AGENT_SOCKET_ENV: self.host.agent.socket,
            }
            env_ok = True
            for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
                name = draw(
                    st.sampled_from(
                        [
                            "CNI_COMMAND",
                            "CNI_CONTAINERID",
                            "CNI_NETNS",
                            "CNI_IFNAME",
                            "CNI_ARGS",
                            "CNI_PATH",
                            plugin.AGENT_SOCKET_ENV,
                        ]
                    )
                )
                value = self._odd_value(draw, name)
                if value is None:
                    env.pop(name, None)
                else:
                    env[name] = value
                env_ok = False
            return Invocation(env, stdin, conf, command, env_ok, stdin_ok, conf_ok)

        return invocations()

    def _odd_value(self, draw, name):
        """A missing (None), odd or plain wrong value for environment variable ``name``."""
        special = {
            "CNI_COMMAND": ["add", "VERSION", "ADD ", "DELETE", "GC", "STATUS"],
            "CNI_CONTAINERID": ["-lead", "a b", "ctr/1", "é", "fz-ok.1_2"],
            "CNI_NETNS": [
                self.file,
                self.scratch,
                os.path.join(self.scratch, "missing"),
                "netns",
                "/dev/null",
                self.netns_path + "/",
                f"/run/netns/../netns/{self.netns}",
            ],
            "CNI_IFNAME": ["lo", "net1", ".", "..", "a/b", "a:b", "x" * 16, "é", "eth 0", "éééééééé"],
            "CNI_ARGS": [
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
                "IP=10.70.0.9",
                "IP=junk",
                "IP=10.70.0.9,fd00::1",
                "=",
                ";;",
                "a",
                "K8S_POD_NAME=" + "p" * 300,
                "IP=192.0.2.1",
            ],
            "CNI_PATH": ["", "/nonexistent", "a:b:c"],
            plugin.AGENT_SOCKET_ENV: [os.path.join(self.scratch, "no-agent.sock"), self.file],
        }[name]
        if name == plugin.AGENT_SOCKET_ENV:
            # Never unset or empty: the config's agent_socket, or the default /run/netplugin/agent.sock, could
            # be an agent of this machine's own, and nothing here may talk to it.
            return draw(st.one_of(st.sampled_from(special), odd_env.filter(lambda v: v not in ("", b""))))
        return draw(st.one_of(st.none(), st.sampled_from(special), odd_env))


# --- running and judging one call ------------------------------------------------------------------------------


def exec_binary(lab, inv):
    """The installed binary, exactly as a runtime runs it."""
    env = {k.encode() if isinstance(k, str) else k: v.encode() if isinstance(v, str) else v for k, v in inv.env.items()}
    p = subprocess.run([lab.host.cni.bin_path], input=inv.stdin, env=env, capture_output=True, timeout=180)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def in_process(lab, inv):
    """The same plugin code called in this interpreter: ``run`` with the environment decoded as os.environ
    decodes it, stdout rendered as ``main`` renders it."""
    env = {k: os.fsdecode(v) for k, v in inv.env.items()}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status, out = plugin.run(env, io.BytesIO(inv.stdin))
    return status, (json.dumps(out) + "\n") if out is not None else "", err.getvalue()


def expected_code(inv):
    """The error code the spec prescribes when we know the input is broken at one level, else None."""
    env = inv.env
    command = env.get("CNI_COMMAND")
    if not command:
        return 4
    if command == "VERSION":
        return 0
    if command not in COMMANDS:
        return 4
    if not inv.env_ok:
        return None  # many odd values are legal (an IP in CNI_ARGS, another ifname): judged by shape only
    return 6 if inv.stdin_ok is False else None


def judge(lab, inv, rc, stdout, stderr):
    """Assert one answer is well-formed and of the right kind; return the parsed object (or None)."""
    where = f"{inv!r}\nrc={rc} stdout={stdout[:2000]!r}\nstderr={stderr[-3000:]!r}"
    assert "Traceback" not in stderr and "Traceback" not in stdout, where
    assert stderr == "", where
    assert rc in (0, 1), where
    assert stdout == "" or (stdout.endswith("\n") and stdout.count("\n") == 1), where
    out = json.loads(stdout) if stdout else None
    command = inv.env.get("CNI_COMMAND")
    want = expected_code(inv)
    if rc == 1:
        assert isinstance(out, dict) and set(out) <= {"cniVersion", "code", "msg", "details"}, where
        assert out["code"] in ERROR_CODES, where
        assert isinstance(out["msg"], str) and 0 < len(out["msg"]) <= 1000, where
        assert out["cniVersion"] in plugin.SUPPORTED_VERSIONS, where
        assert want in (None, out["code"]), f"expected code {want}: {where}"
        pristine = inv.env_ok and inv.stdin_ok is True and inv.conf_ok
        assert not (pristine and command in ("ADD", "DEL", "STATUS", "GC")), f"valid input failed: {where}"
        outcome = f"{command if command in COMMANDS else 'other'} error {out['code']}"
        lab.outcomes[outcome] += 1
        lab.samples.setdefault(outcome, out["msg"][:160])
        return out
    assert want in (None, 0), f"expected code {want}: {where}"
    lab.outcomes[f"{command} ok"] += 1
    if command == "VERSION":
        assert out == plugin.version_info(), where
    elif command == "ADD":
        assert out["cniVersion"] == inv.conf["cniVersion"] and out["interfaces"] and out["ips"], where
    else:
        assert out is None, where
    return out


def del_after_add(lab, inv, call):
    """The runtime's DEL after a successful ADD: same environment, the config's name."""
    conf = json.loads(inv.stdin)
    env = dict(inv.env, CNI_COMMAND="DEL", **{plugin.AGENT_SOCKET_ENV: lab.host.agent.socket})
    del_inv = Invocation(
        env,
        json.dumps({"cniVersion": conf["cniVersion"], "name": conf["name"], "type": "netplugin"}).encode(),
        conf,
        "DEL",
        False,
        True,
        True,
    )
    rc, stdout, stderr = call(lab, del_inv)
    assert rc == 0 and stdout == "" and stderr == "", (inv, stdout, stderr)


def fuzz(lab, call, examples):
    @settings(
        max_examples=examples, deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck)
    )
    @given(inv=lab.strategy())
    def one(inv):
        rc, stdout, stderr = call(lab, inv)
        try:
            judge(lab, inv, rc, stdout, stderr)
        finally:  # even when the answer was wrong: one failure must not leak into every later example
            if rc == 0 and inv.env.get("CNI_COMMAND") == "ADD":
                del_after_add(lab, inv, call)
        left = lab.leftovers()
        assert not left, f"left behind by {inv!r} (rc={rc} {stdout[:500]!r}): {left}"

    started = time.monotonic()
    one()
    took = time.monotonic() - started
    print(f"\n{call.__name__}: {examples} examples in {took:.1f} s; outcomes: {dict(sorted(lab.outcomes.items()))}")
    for outcome, msg in sorted(lab.samples.items()):
        print(f"  {outcome}: e.g. {msg}")


# --- after the storm -------------------------------------------------------------------------------------------


def health(sock_path):
    """The agent's GET /v1/health answer (status line), over its unix socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0].decode()


def sweep_and_check(lab):
    """DEL whatever is left (an ADD the binary gave up on may have completed in the agent), then prove the
    agent alive and nothing left behind."""
    host = lab.host
    assert host.agent.proc.poll() is None, "the agent died:\n" + host.agent.log()
    time.sleep(1.0)  # let ADDs a client stopped waiting for finish in the agent
    leftovers = host.ds.list(keys.endpoint_prefix(host.agent.hostname))
    for kv in leftovers:
        ep = kv.value
        rc, out, err = host.cni.call(
            "DEL", ep["container_id"], "", ep["ifname"], config=dict(host.cni.config, name=ep["network"])
        )
        assert rc == 0, (ep, out, err)
    assert health(host.agent.socket).split()[1] == "200"
    rc, out, err = host.cni.call("STATUS")
    assert (rc, out) == (0, {}), (out, err)
    check = subprocess.run(
        [console_script("netctl"), "--etcd-endpoints", host.ds.config.endpoints[0], "ipam", "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and "clean" in check.stdout, check.stdout + check.stderr
    assert host.container_routes() == []
    wait_until("every veth deleted (the agent finishes that after DEL answers)", lambda: host.veths() == set(), 10)
    assert host.ds.list(keys.ENDPOINTS) == [] and host.ds.list(keys.HANDLES) == []
    links = nsexec(lab.netns, "ip -o link show").stdout
    assert links.count("\n") == 1, links  # only lo in the container
    with open(host.agent.log_path, errors="replace") as f:
        f.seek(lab.log_offset)
        log = f.read()
    assert "Traceback" not in log, log[-6000:]
    return len(leftovers)


@pytest.fixture
def lab(host):
    nss = NamespaceSet()
    scratch = tempdir("npfz-")
    lab = None
    try:
        lab = Lab(host, nss.add(), scratch)
        yield lab
    finally:
        if lab:
            lab.close()
        nss.close()
        rmtree(scratch)


def test_fuzz_installed_binary(lab, fuzz_examples):
    fuzz(lab, exec_binary, max(200, fuzz_examples // IN_PROCESS_FACTOR))
    swept = sweep_and_check(lab)
    print(f"left for the final sweep: {swept} endpoint(s)")


def test_fuzz_in_process(lab, fuzz_examples):
    fuzz(lab, in_process, fuzz_examples)
    swept = sweep_and_check(lab)
    print(f"left for the final sweep: {swept} endpoint(s)")
