"""A RulesetCompiler fed one change at a time gives, after every change, what compile_ruleset gives from scratch.

Random sequences of endpoint puts (new, moved, relabelled, readdressed, local or remote, now and then a bad
address or an id given twice with other contents) and removals, and of policy sets, are applied to one
long-lived compiler; after each step its ruleset (sets, chains, hooks, plan, policy rules, chains per endpoint,
and the inputs revocation judges with) must equal compile_ruleset over the same endpoints and policies, and both
must refuse the same inputs.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netplugin.errors import InvalidInput
from policy.compiler import RulesetCompiler, compile_ruleset
from policy.model import Endpoint, Policy
from tests.unit.test_policy_bpf_render import rules

HOSTS = ("h1", "h2", "h3")  # h1 is the compiling host
IDS = [f"ep-{i}" for i in range(6)]
ADDRESSES = ["10.0.0.1", "10.0.0.2", "10.0.0.3/32", "fd00::1", "fd00::2", "10.0.1.1", "not-an-address"]
APPS = ["web", "db", "x"]
NETWORKS = ["blue", "red"]
SELECTORS = [{}, {"matchLabels": {"app": "web"}}, {"matchLabels": {"app": "db"}}, {"matchLabels": {"app": "x"}}]


@st.composite
def endpoint(draw):
    ep_id = draw(st.sampled_from(IDS))
    addresses = draw(st.lists(st.sampled_from(ADDRESSES[:-1]), min_size=1, max_size=2, unique=True))
    if draw(st.integers(0, 30)) == 0:
        addresses.append(ADDRESSES[-1])
    labels = {"app": draw(st.sampled_from(APPS))}
    if draw(st.booleans()):
        labels["tier"] = "1"
    ifname = f"np{int(ep_id[3:]):011x}" if draw(st.integers(0, 30)) else "eth0"
    return Endpoint(ep_id, ifname, addresses, draw(st.sampled_from(NETWORKS)), labels)


@st.composite
def policy(draw, name):
    types = draw(st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    spec = {"order": draw(st.sampled_from([1, 2, 1000])), "selector": draw(st.sampled_from(SELECTORS)), "types": types}
    for direction in types:
        spec[direction.lower()] = [draw(rules(direction)) for _ in range(draw(st.integers(0, 3)))]
    return Policy.from_dict({"apiVersion": "netplugin/v1", "kind": "Policy", "metadata": {"name": name}, "spec": spec})


@st.composite
def steps(draw):
    pool = [draw(policy(f"p{i}")) for i in range(4)] + [draw(policy("p0"))]  # the last one's name is taken
    out = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["put", "put", "put", "remove", "policies"]))
        if kind == "put":
            ep = draw(endpoint())
            # Mostly the id's own key on one host; now and then the same id at a second key (another host).
            host = draw(st.sampled_from(HOSTS))
            out.append(("put", (host, ep.id if draw(st.integers(0, 8)) else "other"), ep))
        elif kind == "remove":
            out.append(("remove", (draw(st.sampled_from(HOSTS)), draw(st.sampled_from(IDS + ["other"])))))
        else:
            chosen = draw(st.lists(st.sampled_from(range(len(pool))), max_size=4, unique=True))
            if 4 in chosen and draw(st.integers(0, 4)):
                chosen.remove(4)  # two policies named p0 only now and then
            out.append(("policies", [pool[i] for i in chosen]))
    return out


def _from_scratch(held, policies):
    local = [ep for (host, _), ep in held.items() if host == "h1"]
    try:
        return compile_ruleset(local, list(held.values()), policies)
    except InvalidInput:
        return None


def _judged(ruleset):
    """What revocation (policy.revoke) reads of a ruleset's inputs."""
    local, everyone, policies = ruleset.inputs
    contents = [(e.id, e.network, sorted(e.addresses), e.labels) for e in everyone]
    return tuple(local), contents, tuple(policies)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps())
def test_one_change_at_a_time_equals_compiling_from_scratch(sequence):
    compiler = RulesetCompiler()
    held, policies = {}, []
    for step in sequence:
        if step[0] == "put":
            _, key, ep = step
            held[key] = ep
            compiler.put(key, ep, local=key[0] == "h1")
        elif step[0] == "remove":
            held.pop(step[1], None)
            compiler.remove(step[1])
        else:
            policies = step[1]
            compiler.set_policies(policies)
        want = _from_scratch(held, policies)
        try:
            got = compiler.ruleset()
        except InvalidInput:
            got = None
        assert (got is None) == (want is None), step
        if want is not None:
            assert got == want and hash(got.ipsets) == hash(want.ipsets), step  # (renderers key caches by sets)
            assert _judged(got) == _judged(want), step


def test_an_unchanged_input_gives_the_same_ruleset_and_untouched_sets_stay_the_same_objects():
    a = Endpoint("a", "np0000000000a", ["10.0.0.1"], "blue", {"app": "web"})
    b = Endpoint("b", "", ["10.0.0.2"], "blue", {"app": "db"})
    p = Policy.from_dict(
        {
            "apiVersion": "netplugin/v1",
            "kind": "Policy",
            "metadata": {"name": "web"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "ingress": [{"action": "allow", "from": [
                {"selector": {"matchLabels": {"app": "db"}}}]}]},
        }
    )  # fmt: skip
    compiler = RulesetCompiler()
    compiler.put(("h1", "a"), a, local=True)
    compiler.put(("h2", "b"), b)
    compiler.set_policies([p])
    first = compiler.ruleset()
    compiler.put(("h2", "b"), Endpoint("b", "", ["10.0.0.2"], "blue", {"app": "db"}))  # equal: nothing changed
    compiler.set_policies([p])
    assert compiler.ruleset() is first
    compiler.put(("h3", "c"), Endpoint("c", "", ["10.0.0.3"], "red", {"app": "x"}))  # matches no set
    second = compiler.ruleset()
    assert second == first and second is not first and len(second.inputs[1]) == 3
    assert all(x is y for x, y in zip(second.ipsets, first.ipsets))
    assert second.plan is first.plan and second.chains is first.chains
