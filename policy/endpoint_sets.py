"""Every endpoint of the cluster, and the members of the compiler's address sets made of endpoints, kept up to date
one endpoint at a time.

The compiler (policy/compiler.py) names three kinds of sets whose members are endpoints' addresses: ``all``
(every endpoint), ``net`` (one network's) and ``sel`` (one selector's). They are the only part of a host's
ruleset that depends on endpoints of other hosts, and a remote endpoint's ADD or DEL changes nothing else. So
instead of filtering every endpoint of the cluster for every set on every event, this index holds the sets the
compiler currently names (``track``) and moves one endpoint in or out of those it matches (``put``,
``remove``): a change costs O(sets tracked x its addresses), a set the compiler starts naming O(endpoints) once.

Members are kept as the compiler emits them (canonical network texts, in address order, each once however many
endpoints hold it), and a set's ``IpSet`` is rebuilt only when its members changed, so an unchanged set is the
same object in the next ruleset and comparing rulesets is cheap.
"""

import bisect
import functools
import ipaddress

from netplugin.errors import InvalidInput


class EndpointSets:
    def __init__(self, make_ipset):
        self._make_ipset = make_ipset  # (kind, family, key, members tuple) -> IpSet
        self._sources = {}  # caller's key -> Endpoint
        self._by_id = {}  # endpoint id -> {caller's key: Endpoint}: one, unless an id is given twice
        self._bad = {}  # caller's key -> why its endpoint is left out (a bad address)
        self._shared = set()  # ids given at more than one key
        self._effective = {}  # endpoint id -> (Endpoint, {family: [networks]}, its key) the sets hold
        self._ids = []  # the ids of _effective, sorted, and their endpoints beside them (``everyone``)
        self._eps = []
        self._tracked = {}  # (kind, family, key) -> _Members
        self.changed = False  # a tracked set's members changed since the caller last cleared this

    # -- endpoints ------------------------------------------------------------------------------------------

    def put(self, key, ep):
        """``ep`` (a policy.model.Endpoint) stands at the caller's ``key`` now; returns whether anything the
        compiler sees changed (an equal endpoint replacing another changes nothing)."""
        old = self._sources.get(key)
        if old is not None and old == ep and key not in self._bad:
            self._sources[key] = self._by_id[ep.id][key] = ep
            return False
        self.remove(key)
        try:
            networks = endpoint_networks(ep)
        except InvalidInput as e:
            self._bad[key] = str(e)
            self._sources[key] = ep
            return True
        self._sources[key] = ep
        holders = self._by_id.setdefault(ep.id, {})
        holders[key] = ep
        if len(holders) > 1:
            self._shared.add(ep.id)
        if ep.id not in self._effective:
            self._enter(key, ep, networks)
        return True

    def remove(self, key):
        """Nothing stands at ``key`` any more; returns whether something did."""
        ep = self._sources.pop(key, None)
        if ep is None:
            return False
        if self._bad.pop(key, None) is not None:
            return True
        holders = self._by_id[ep.id]
        del holders[key]
        if len(holders) < 2:
            self._shared.discard(ep.id)
        if self._effective[ep.id][2] == key:
            self._leave(ep.id)
            if holders:
                first_key, first = next(iter(holders.items()))
                self._enter(first_key, first, endpoint_networks(first))
        if not holders:
            del self._by_id[ep.id]
        return True

    def errors(self):
        """Why the endpoints given cannot be compiled: bad addresses, one id given with different contents."""
        out = list(self._bad.values())
        for ep_id in sorted(self._shared):
            if len({_content(e) for e in self._by_id[ep_id].values()}) > 1:
                out.append(f"compiling policy: endpoint {ep_id} is given twice with different contents")
        return out

    def everyone(self):
        """Every endpoint (one per id), sorted by id."""
        return tuple(self._eps)

    def networks(self, ep_id):
        return self._effective[ep_id][1]

    def _enter(self, key, ep, networks):
        self._effective[ep.id] = (ep, networks, key)
        i = bisect.bisect_left(self._ids, ep.id)
        self._ids.insert(i, ep.id)
        self._eps.insert(i, ep)
        for members in self._tracked.values():
            if members.holds(ep):
                self.changed |= members.add(networks[members.family])

    def _leave(self, ep_id):
        ep, networks, _ = self._effective.pop(ep_id)
        i = bisect.bisect_left(self._ids, ep_id)
        del self._ids[i], self._eps[i]
        for members in self._tracked.values():
            if members.holds(ep):
                self.changed |= members.discard(networks[members.family])

    # -- sets -----------------------------------------------------------------------------------------------

    def track(self, specs):
        """Hold exactly the sets ``specs`` names ((kind, family, key) -> the selector for kind "sel", else
        None); a set new here is filled from every endpoint."""
        for spec in list(self._tracked):
            if spec not in specs:
                del self._tracked[spec]
        for spec, selector in specs.items():
            if spec not in self._tracked:
                members = self._tracked[spec] = _Members(*spec, selector)
                for ep, networks, _ in self._effective.values():
                    if members.holds(ep):
                        members.add(networks[members.family])

    def ipset(self, spec):
        members = self._tracked[spec]
        if members.ipset is None:
            members.ipset = self._make_ipset(*spec, tuple(members.texts))
        return members.ipset


class _Members:
    """One tracked set: its member texts in the compiler's order, and how many endpoints hold each."""

    def __init__(self, kind, family, key, selector):
        self.kind, self.family, self.key, self.selector = kind, family, key, selector
        self.count = {}  # text -> endpoints holding it
        self.order = []  # sort keys of the texts, ascending
        self.texts = []
        self.ipset = None  # built from texts when first asked for since they changed

    def holds(self, ep):
        if self.kind == "all":
            return True
        if self.kind == "net":
            return ep.network == self.key
        return self.selector.matches(ep.labels)

    def add(self, nets):
        changed = False
        for text in nets:
            n = self.count.get(text, 0)
            self.count[text] = n + 1
            if n == 0:
                order = _order(text)
                i = bisect.bisect_left(self.order, order)
                self.order.insert(i, order)
                self.texts.insert(i, text)
                changed = True
        if changed:
            self.ipset = None
        return changed

    def discard(self, nets):
        changed = False
        for text in nets:
            n = self.count[text] - 1
            if n:
                self.count[text] = n
                continue
            del self.count[text]
            i = bisect.bisect_left(self.order, _order(text))
            del self.order[i], self.texts[i]
            changed = True
        if changed:
            self.ipset = None
        return changed


def endpoint_networks(ep):
    """{4: [...], 6: [...]}: an endpoint's addresses as host networks. Raises InvalidInput for a bad one."""
    out = {4: [], 6: []}
    for addr in ep.addresses:
        try:
            version, net = host_network(addr)
        except (ValueError, TypeError):  # TypeError: not a string (unhashable for the cache)
            raise InvalidInput(f"compiling policy: endpoint {ep.id} has a bad address {addr!r}") from None
        out[version].append(net)
    return out


# Parsing the same addresses again was most of a compile; strings are immutable, so parse each once (bounded:
# a 10,000-CIDR policy still fits).
@functools.lru_cache(maxsize=16384)
def host_network(addr):
    """'10.0.0.5' or '10.0.0.5/24' -> (4, '10.0.0.5/32'). Raises ValueError."""
    ip = ipaddress.ip_interface(addr).ip
    return ip.version, str(ipaddress.ip_network(ip))


@functools.lru_cache(maxsize=65536)
def _order(text):
    """The position of a member in the compiler's order (ipaddress's: by address, then prefix length)."""
    net = ipaddress.ip_network(text)
    return int(net.network_address) << 8 | net.prefixlen


def _content(ep):
    return (ep.network, tuple(sorted(ep.addresses)), tuple(sorted(ep.labels.items())))
