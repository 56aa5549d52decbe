"""The eBPF dataplane backend: today's veth builder for the wiring, tc programs for anti-spoofing and redirects.

It implements netplugin.dataplane.backend.Backend. The programs (netplugin/kernel/bpf) are loaded and pinned
once per host under ``bpffs``; each endpoint's host veth gets ``from_container`` on its ingress and entries in
``np_endpoints`` (the addresses it may send from) and ``np_locals`` (where redirect_peer delivers to it); the
fabric interfaces get ``to_container``. Map entries are written with the bpf() syscall from this process, and
filters attached by netlink with the pinned program's fd: no process per endpoint. Pins and filters outlive
the agent, so traffic keeps flowing while it restarts; every reconcile recomputes the wanted map contents from
the desired endpoints, diffs them against the maps and re-attaches missing filters (level-triggered).
Docker endpoints get the same, from the veth pair at Join. A rebuilt object is staged as a new pin generation
at start and committed by the first reconcile that has re-filled its maps (docs/bpf-design.md).

Policy: every compiled ruleset is written twice, by the iptables writers (the filter table stays the slow path
for what the programs hand to the stack: ARP, ND, fragments, endpoints the programs do not know) and as BPF
policy lists (``policy/bpf_render.py`` renders the same plan). Lists are double-buffered: a changed list is
written into the endpoint's idle slot, ``np_endpoints``' slot switched with one update, the policy generation
bumped (cached flow verdicts are re-checked at their next packet), then the old slot deleted. An endpoint whose
lists the program cannot hold keeps none, so its packets go to the stack and iptables, said in one log line.
``np_fast_dsts`` holds the pools (redirect) and this host's blocks (value 0: to the stack, so a local address
the programs do not know meets iptables). NAT-outgoing stays with the nat table writer.
"""

import dataclasses
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from netplugin.agent.backend import IptablesBackend, iptables_backend
from netplugin.dataplane.docker_link import CONTAINER_END_PREFIX
from netplugin.dataplane.model import host_ifname, is_host_ifname
from netplugin.errors import NetpluginError
from netplugin.kernel.bpf import build, loader, maps, records
from netplugin.kernel.netlink import netlink
from policy.bpf_render import render

LOG = logging.getLogger(__name__)
OBJECT = "netplugin.o"
FROM_CONTAINER, TO_CONTAINER = "from_container", "to_container"
# An upgrade's fresh (changed-layout) maps: these the endpoint reconcile re-fills before it commits; these may
# start empty (counters restart, flows are evaluated again, the policy generation is rewritten by the next
# policy pass). Any other fresh map delays the commit by one whole pass.
REFILLED_BY_RECONCILE = frozenset({"np_endpoints", "np_locals"})
MAY_START_EMPTY = frozenset({"np_counters", "np_flows", "np_config"})


def default_object_dir():
    """Where scripts/setup.sh builds the objects: build/bpf beside the package's source tree."""
    return str(Path(build.__file__).resolve().parents[3] / "build" / "bpf")


class BpfBackend(IptablesBackend):
    """The iptables backend's writers for wiring, policy and NAT, plus the programs and their maps."""

    background_link_deletion = False  # remove_endpoint prunes the maps of veths that are gone: wait for it

    def __init__(self, inner: IptablesBackend, pins: loader.Pins, staged: loader.Stage | None = None):
        super().__init__(inner.endpoints, inner.policy, inner.nat)
        self.pins = pins  # the generation this agent writes and attaches (select_backend fixes it: not "current")
        self.staged = staged if staged and staged.pending else None  # an upgrade, committed by _upgrade
        self._passes_staged = 0
        self.name = "bpf"
        # np_endpoints' slot field is switched by the policy pass and rewritten by the endpoint pass
        self._ep_lock = threading.Lock()
        self._held = None  # {(map id, slot): ({np_pol_rules key: value}, {np_pol_peers key: value})} we wrote
        self._written = {}  # (map id, slot) -> the rendered lists (by direction) those entries hold
        self._problems = {}  # endpoint id -> why its lists are not in the maps (logged once per reason)
        self._pools, self._blocks = None, ()
        self._rendered = {}  # policy.bpf_render's cache: lists rendered for the last ruleset
        self._ruleset = None  # the last ruleset whose lists were written
        self._lists_lock = threading.Lock()  # one writer of the lists: a policy pass or an ADD

    # --- host ---------------------------------------------------------------------------------------------------

    def setup_host(self) -> dict:
        out = dict(super().setup_host())
        out["bpf_fabric"] = self._attach_fabric()
        return out

    def _fabric_links(self, nl):
        return [
            m
            for m in nl.links()
            if m.get("ifname") not in (None, "lo")
            and not is_host_ifname(m.get("ifname"))
            and not m.get("ifname").startswith(CONTAINER_END_PREFIX)
        ]

    def _attach_fabric(self) -> list:
        """``to_container`` on every interface that is neither loopback nor an endpoint's veth; names attached."""
        with netlink(self.host_netns) as nl:
            links = self._fabric_links(nl)
        running, ours = loader.programs(self.host_netns), self._our_ids()
        done = []
        for m in links:
            if running.get(m["index"], {}).get(TO_CONTAINER) not in ours[TO_CONTAINER]:
                loader.attach(self.pins.prog(TO_CONTAINER), m["index"], netns=self.host_netns)
                done.append(m.get("ifname"))
        return done

    def _our_ids(self) -> dict:
        """Program name -> the ids a filter may run: ours, and while an upgrade is staged the old ones too (it
        swaps them all at once); any other program on our hook (flushed and re-added, a stale generation) is
        replaced by a reconcile."""
        out = {name: {i} for name, i in self.pins.prog_ids().items()}
        if self.staged:
            for name, i in self.staged.old.prog_ids().items():
                out.setdefault(name, set()).add(i)
        return out

    # --- upgrade --------------------------------------------------------------------------------------------------

    def _upgrade(self) -> dict:
        """Commit a staged generation once its fresh maps hold what they must: the endpoint maps this reconcile
        has just written; maps only other passes fill (policy, fast destinations) after one more whole pass.
        Until then the old programs run on the old veths with maps that are the same or still full."""
        if self.staged is None:
            return {}
        self._passes_staged += 1
        waiting = set(self.staged.fresh) - REFILLED_BY_RECONCILE - MAY_START_EMPTY
        if waiting and self._passes_staged < 2:
            return {"upgrade_waiting_for": sorted(waiting)}
        st = self.staged
        done = loader.commit(st, self.host_netns)
        self.staged = None
        LOG.info(
            "event=bpf.upgraded generation=%s replaced=%s filters_swapped=%d commit_ms=%.1f maps_reused=%s "
            "maps_copied=%s maps_refilled=%s",
            done["generation"],
            done["replaced"],
            len(done["swapped"]),
            done["ms"],
            ",".join(st.reused) or "-",
            ",".join(st.copied) or "-",
            ",".join(st.fresh) or "-",
        )
        return {"upgraded": done["generation"], "filters_swapped": len(done["swapped"])}

    # --- endpoints ------------------------------------------------------------------------------------------------

    def add_endpoint(self, spec):
        state = super().add_endpoint(spec)
        self._converge([spec])
        # A new endpoint's record is written with its addresses, before its veth exists, so a policy pass may
        # have compiled it already and skipped its lists (np_endpoints did not know it): write them now.
        with self._lists_lock:
            if self._ruleset is not None:
                self._write_lists(render(self._ruleset, self._rendered), reread=self._held is None)
        return state

    def remove_endpoint(self, endpoint_id, netns=None, ifname="eth0"):
        super().remove_endpoint(endpoint_id, netns, ifname)
        self._prune_gone()

    def add_docker_endpoint(self, spec):
        """The host veth exists once libnetwork has our Join answer, the container end still beside it: its MAC
        (the link's) is all np_locals needs, so the sandbox is never opened. Reconciled like CNI endpoints from
        then on (the record keeps the MAC: EndpointService.spec_of)."""
        link = super().add_docker_endpoint(spec)
        self._converge([dataclasses.replace(spec, mac=link.mac or spec.mac)])
        return link

    def remove_docker_endpoint(self, endpoint_id) -> bool:
        removed = super().remove_docker_endpoint(endpoint_id)
        self._prune_gone()
        return removed

    def reconcile(self, desired, blocks, deletable=frozenset()) -> dict:
        summary = super().reconcile(desired, blocks, deletable=deletable)
        summary = dict(summary) if isinstance(summary, dict) else {"endpoints": summary}
        summary["bpf"] = self._converge(desired, prune=True)
        if summary["bpf"]["attached"]:  # ADD attaches its own: here only a filter someone removed or replaced
            LOG.warning("event=bpf.reattached host_ifs=%s", ",".join(summary["bpf"]["attached"]))
        summary["bpf"]["fabric_attached"] = self._attach_fabric()
        self._blocks = tuple(blocks)
        summary["bpf"]["np_fast_dsts"] = self._sync_fast_dsts()
        summary["bpf"].update(self._upgrade())
        return summary

    def converge_blocks(self, blocks) -> dict:
        summary = dict(super().converge_blocks(blocks))
        self._blocks = tuple(blocks)
        summary["bpf"] = {"np_fast_dsts": self._sync_fast_dsts()}
        return summary

    # --- policy ---------------------------------------------------------------------------------------------------

    def apply_policy(self, ruleset, full=False) -> tuple:
        diffs, timings = super().apply_policy(ruleset, full=full)
        started = time.monotonic()
        with self._lists_lock:
            notes = self._write_lists(render(ruleset, self._rendered), reread=full or self._held is None)
            self._ruleset = ruleset
        return list(diffs) + notes, dict(timings, bpf=time.monotonic() - started)

    def _read_lists(self, rules_map, peers_map) -> dict:
        held = {}
        for key, value in rules_map.items():
            ep_id, slot, _ = records.split_ep_dir(records.IFINDEX.unpack(key)[0])
            held.setdefault((ep_id, slot), ({}, {}))[0][key] = value
        for key, value in peers_map.items():
            ep_id, slot, _ = records.split_ep_dir(records.pol_key_ep_dir(key))
            held.setdefault((ep_id, slot), ({}, {}))[1][key] = value
        return held

    def _note_problem(self, lists):
        if lists.problem and self._problems.get(lists.id) != lists.problem:
            LOG.warning(
                "event=bpf.policy_on_iptables endpoint=%s host_if=%s reason=%r: its BPF lists are left empty, so"
                " its packets go to the stack, where the iptables chains enforce its policy",
                lists.id,
                lists.host_ifname,
                lists.problem,
            )
        if lists.problem:
            self._problems[lists.id] = lists.problem
        else:
            self._problems.pop(lists.id, None)

    def _write_lists(self, rendered, reread) -> list:
        """Make np_pol_rules/np_pol_peers hold ``rendered`` (EndpointLists) for the endpoints np_endpoints knows,
        and nothing else; the changes made, as notes. ``reread``: read the maps back instead of trusting what
        the last call left (a full resync, or the first call after a restart)."""
        with netlink(self.host_netns) as nl:
            index = {m.get("ifname"): m["index"] for m in nl.links()}
        notes = []
        with (
            self._ep_lock,
            self.pins.map("np_endpoints") as eps,
            self.pins.map("np_pol_rules") as rules_map,
            self.pins.map("np_pol_peers") as peers_map,
        ):
            held = self._read_lists(rules_map, peers_map) if reread else self._held
            written = {} if reread else self._written
            self._held = None  # unknown until this pass went through
            live, switched = set(), []
            for lists in rendered:
                self._note_problem(lists)
                idx = index.get(lists.host_ifname)
                value = eps.lookup(records.ifindex_key(idx)) if idx is not None else None
                if value is None or lists.problem:
                    continue  # the programs do not know it (or cannot hold its lists): the stack's
                ep_id, slot = records.ENDPOINT.unpack(value)[0], records.endpoint_slot(value)
                # Rendered lists are shared objects (the render cache), so comparing them is cheap; map bytes
                # are compared only after a read-back.
                if written.get((ep_id, slot)) == lists.lists or (
                    (ep_id, slot) not in written and held.get((ep_id, slot)) == lists.entries(ep_id, slot)
                ):
                    written[(ep_id, slot)] = lists.lists
                    live.add((ep_id, slot))
                    continue
                new = 1 - slot
                self._delete(held, (ep_id, new), rules_map, peers_map)
                want = lists.entries(ep_id, new)
                for key, v in want[1].items():
                    peers_map.update(key, v)
                for key, v in want[0].items():
                    rules_map.update(key, v)
                held[(ep_id, new)] = want
                written[(ep_id, new)] = lists.lists
                # The switch: one update, of an entry that still exists (a removed endpoint is not brought back;
                # its new lists go in the sweep below).
                try:
                    eps.update(records.ifindex_key(idx), records.with_slot(value, new), maps.BPF_EXIST)
                except maps.BpfError:
                    if eps.lookup(records.ifindex_key(idx)) is not None:
                        raise
                    continue
                live.add((ep_id, new))
                switched.append((ep_id, slot))
                notes.append(f"bpf: {lists.id} lists in slot {new} ({len(want[1])} peer prefixes)")
            if switched:
                gen = self._bump_generation()
                LOG.info("event=bpf.policy_written endpoints=%d policy_gen=%d", len(switched), gen)
            for owner in sorted(set(held) - live):  # old slots, endpoints gone or left to iptables
                self._delete(held, owner, rules_map, peers_map)
                notes.append(f"bpf: lists of map id {owner[0]} slot {owner[1]} deleted")
            self._held, self._written = held, {k: v for k, v in written.items() if k in live}
        return notes

    @staticmethod
    def _delete(held, owner, rules_map, peers_map):
        rules, peers = held.pop(owner, ({}, {}))
        for key in rules:
            rules_map.delete(key)
        for key in peers:
            peers_map.delete(key)

    def _bump_generation(self) -> int:
        """Every cached flow verdict is re-checked at its next packet (np_config's policy generation)."""
        with self.pins.map("np_config") as m:
            key = records.IFINDEX.pack(0)
            gen = (records.config_gen(m.lookup(key)) + 1) & 0xFFFFFFFF
            m.update(key, records.config(gen))
        return gen

    # --- where redirects may carry traffic --------------------------------------------------------------------------

    def set_nat_outgoing(self, pools, full=False) -> list:
        notes = super().set_nat_outgoing(pools, full=full)
        self._pools = tuple(sorted(p.cidr for p in pools))
        self._sync_fast_dsts()
        return notes

    def _sync_fast_dsts(self) -> int:
        """np_fast_dsts: every pool (1: redirect), this host's blocks (0: more specific, to the stack); level
        triggered. Nothing until the pools are known."""
        if self._pools is None:
            return 0
        want = {records.net_key(c): b"\x01" for c in self._pools}
        want.update({records.net_key(b): b"\x00" for b in self._blocks})
        return self._sync_map("np_fast_dsts", want, prune=True)

    def _known_macs(self) -> dict:
        """Container MACs np_locals already holds, by host veth ifindex: a resync need not open every netns."""
        with self.pins.map("np_locals") as m:
            out = {}
            for key in m.keys():
                value = m.lookup(key)
                if value is not None:
                    _, idx, cmac, _ = records.LOCAL.unpack(value)
                    out[idx] = cmac.hex(":")
            return out

    def _container_mac(self, spec):
        try:
            with netlink(spec.netns) as cnl:
                cont = cnl.link(name=spec.ifname)
        except (OSError, NetpluginError):  # a namespace that vanished has no endpoint to program
            return None
        return cont.get("address") if cont else None

    def _known_slots(self) -> dict:
        """The live policy slot of each np_endpoints entry, by ifindex (the policy pass owns it)."""
        with self.pins.map("np_endpoints") as m:
            return {records.IFINDEX.unpack(k)[0]: records.endpoint_slot(v) for k, v in m.items()}

    def _wanted(self, specs) -> tuple:
        """(np_endpoints, np_locals, host veths) wanted for ``specs``: computed from the kernel's links."""
        eps, locs, veths = {}, {}, {}
        known = self._known_macs()
        slots = self._known_slots()
        with netlink(self.host_netns) as hnl:
            for spec in specs:
                host = hnl.link(name=host_ifname(spec.endpoint_id))
                if host is None or not spec.addresses:
                    continue
                idx = host["index"]  # the endpoint's id in the maps: unique on this host while its veth lives
                mac = spec.mac or known.get(idx) or self._container_mac(spec)
                if not mac:
                    continue
                addrs = [str(a).split("/")[0] for a in spec.addresses]
                eps[records.ifindex_key(idx)] = records.endpoint(idx, addrs, slots.get(idx, 0))
                for a in addrs:
                    locs[records.addr16(a)] = records.local(idx, idx, mac, host.get("address"))
                veths[idx] = host.get("ifname")
        return eps, locs, veths

    def _converge(self, specs, prune=False) -> dict:
        with self._ep_lock:
            eps, locs, veths = self._wanted(specs)
            changed = {
                "np_endpoints": self._sync_map("np_endpoints", eps, prune),
                "np_locals": self._sync_map("np_locals", locs, prune),
            }
        attached = []
        running, ours = loader.programs(self.host_netns), self._our_ids()
        for idx, name in veths.items():
            if running.get(idx, {}).get(FROM_CONTAINER) not in ours[FROM_CONTAINER]:
                loader.attach(self.pins.prog(FROM_CONTAINER), idx, netns=self.host_netns)
                attached.append(name)
        with self.pins.map("np_counters") as m:
            for key in eps:
                if m.lookup(key) is None:
                    m.update(key, bytes(records.COUNTERS.size))
        changed["attached"] = attached
        return changed

    def _prune_gone(self):
        """Drop the map entries whose host veth is gone."""
        with netlink(self.host_netns) as hnl:
            alive = {m["index"] for m in hnl.links()}
        for name, owner in (
            ("np_endpoints", lambda k, v: records.IFINDEX.unpack(k)[0]),
            ("np_locals", lambda k, v: records.LOCAL.unpack(v)[1]),
        ):
            with self.pins.map(name) as m:
                for key in list(m.keys()):
                    v = m.lookup(key)
                    if v is not None and owner(key, v) not in alive:
                        m.delete(key)

    def _sync_map(self, name, want: dict, prune: bool) -> int:
        """Write ``want`` into the map; with ``prune`` delete every key not wanted. The number of changes."""
        n = 0
        with self.pins.map(name) as m:
            for key, value in want.items():
                if m.lookup(key) != value:
                    m.update(key, value)
                    n += 1
            if prune:
                for key in list(m.keys()):
                    if key not in want:
                        m.delete(key)
                        n += 1
        return n


def _probe(bpffs, object_dir) -> str | None:
    """Why the kernel or host cannot run the bpf dataplane, or None when it can (before loading)."""
    if not os.path.exists("/proc/sys/kernel/unprivileged_bpf_disabled"):
        return "the kernel has no BPF syscall (CONFIG_BPF_SYSCALL)"
    if not os.path.exists(build.KERNEL_BTF):
        return f"no kernel BTF at {build.KERNEL_BTF}"
    if shutil.which("bpftool") is None:
        return "bpftool is not installed (scripts/setup.sh installs it)"
    obj = os.path.join(object_dir, OBJECT)
    if not os.path.isfile(obj):
        return f"no BPF object {obj} (build it: python -m netplugin.kernel.bpf.build {object_dir})"
    os.makedirs(bpffs, exist_ok=True)
    if not loader.is_bpffs(bpffs):
        return f"{bpffs} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)"
    return None


def select_backend(config):
    """The backend ``config.dataplane`` asks for if this host can run it, else iptables: (backend, name, why).
    The agent logs ``why`` in one line (``log_selection``) when it starts: never a silent fallback."""
    inner = iptables_backend(config.mtu)
    if config.dataplane != "bpf":
        reason = "iptables requested"
        name, backend = "iptables", inner
    else:
        object_dir = config.bpf_objects or default_object_dir()
        why = _probe(config.bpffs, object_dir)
        staged = None
        if why is None:
            try:
                staged = loader.stage(os.path.join(object_dir, OBJECT), config.bpffs)  # the verifier's verdict
                why = loader.probe_tc(staged.pins.prog(FROM_CONTAINER))  # clsact and cls_bpf, in our netns
            except (loader.LoadError, OSError) as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            if why is not None and staged is not None:
                loader.discard(staged)
        if why is None:
            name, backend = "bpf", BpfBackend(inner, staged.pins, staged)
            reason = f"kernel offers BPF, BTF, clsact and cls_bpf, verified the programs; pinned under {config.bpffs}"
            if staged.pending:
                reason += f" as {staged.pins.generation}, upgrading {staged.old.generation}"
        else:
            name, backend = "iptables", inner
            reason = f"bpf requested but {why}: falling back"
    return backend, name, reason


def log_selection(wanted, name, reason):
    """The one line saying which dataplane runs and why (a fallback at WARNING)."""
    LOG.log(
        logging.WARNING if name != wanted else logging.INFO,
        "event=dataplane.selected dataplane=%s reason=%r",
        name,
        reason,
    )
