// SPDX-License-Identifier: GPL-2.0
/* netplugin's tc programs (cls_bpf, direct action, on clsact hooks).
 *
 * from_container: tc ingress of a container's host-side veth (packets the container sends).
 *   anti-spoofing (source must be one of the endpoint's addresses), egress policy, then a local
 *   destination goes straight into its container (bpf_redirect_peer), one in the cluster's pools
 *   (np_fast_dsts) through a FIB lookup and bpf_redirect / bpf_redirect_neigh out of the host, and any
 *   other to the stack (NAT-outgoing happens there).
 * to_container: tc ingress of a fabric (uplink) interface.  A destination in the local-endpoint map
 *   gets ingress policy, then bpf_redirect_peer into the container's veth when the source is in the pools
 *   (else the stack, as the other direction went).
 *
 * Whenever the program is unsure (ARP, ND, IPv6 extension headers, fragments, no map entry, FIB lookup
 * not SUCCESS/NO_NEIGH) it returns TC_ACT_OK and the normal stack (routing + iptables) takes the packet.
 *
 * Policy (the default build) is evaluated once per flow: a flow table (LRU hash) caches the verdict of the
 * first packet for both directions, stamped with the policy generation; when the agent bumps the generation
 * (np_config) every flow is re-checked, from its originating direction, at its next packet, so established
 * flows keep flowing after a policy change unless the new policy revokes them.
 *
 * Build variants (the lab measures them; the dataplane uses the default):
 *   -DNP_NO_FLOWS    policy evaluated on every packet (no flow table)
 *   -DNP_NO_POLICY   redirect only
 *   -DNP_CT_GATE     no BPF policy: fast path only for flows conntrack marked accepted (iptables decides
 *                    each flow's first packets and sets NP_CT_ACCEPTED in ct->mark)
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_ALEN 6
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_ICMPV6 58
#define NP_MAX_ADDRS 4
#define NP_MAX_RULES 64
#define NP_MAX_PORT_RANGES 8
#define NP_CT_ACCEPTED 0x1000000
#define NP_REMOTE 0xffffffff

/* Rule actions; LOG counts and goes on to the next rule, like iptables' LOG target. */
#define NP_ACT_NONE 0
#define NP_ACT_ALLOW 1
#define NP_ACT_DENY 2
#define NP_ACT_LOG 3

#define NP_DIR_EGRESS 0  /* traffic leaving the endpoint */
#define NP_DIR_INGRESS 1 /* traffic toward the endpoint */

/* An endpoint as its host-side veth sees it: key = ifindex of the host-side veth. */
struct np_endpoint {
	__u32 id;   /* endpoint number: keys policy and counters */
	__u32 n4;
	__u32 n6;
	__u32 pol_slot; /* which of the two copies of its policy lists is live (0 or 1): see np_pol_key */
	__be32 v4[NP_MAX_ADDRS];
	struct in6_addr v6[NP_MAX_ADDRS];
};

/* A local destination: key = address (IPv4 as ::ffff:a.b.c.d). */
struct np_addr_key {
	__u8 addr[16];
};

struct np_local {
	__u32 id;
	__u32 host_ifindex; /* host-side veth: bpf_redirect_peer lands on its peer, the container's eth0 */
	__u8 container_mac[ETH_ALEN];
	__u8 host_mac[ETH_ALEN];
};

/* Policy peers: one LPM trie for every endpoint and direction.  The key's first 32 bits are
 * (endpoint id << 2 | slot << 1 | direction), always matched in full, then the peer address; the value is
 * the set of rules (bit i = rule i of that endpoint's list) whose peer set contains the address.  The
 * renderer folds covering prefixes and notCIDR exclusions into each entry, so 10,000 CIDRs are still one
 * lookup.  Two slots per endpoint: the agent writes a new list beside the live one, then switches
 * np_endpoints' pol_slot with one update, so no packet sees half a list. */
struct np_pol_key {
	__u32 prefixlen;
	__be32 ep_dir;
	__u8 addr[16];
};

struct np_rule {
	__u8 proto;   /* 0 = any */
	__u8 action;
	__u8 nports;  /* 0 = any port */
	__u8 any_peer; /* 1: the rule matches every peer, no LPM bit needed */
	__u16 lo[NP_MAX_PORT_RANGES];
	__u16 hi[NP_MAX_PORT_RANGES];
};

/* The ordered rules of one endpoint and direction; the first ALLOW/DENY that matches decides. */
struct np_rules {
	__u32 n;
	__u32 default_action; /* when no rule matches */
	struct np_rule r[NP_MAX_RULES];
};

struct np_counters {
	__u64 allowed;
	__u64 denied;
	__u64 spoofed;
	__u64 logged;
	__u64 to_stack;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct np_endpoint);
} np_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct np_addr_key);
	__type(value, struct np_local);
} np_locals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1048576);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct np_pol_key);
	__type(value, __u64);
} np_pol_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__type(key, __u32); /* ep_dir (id << 2 | slot << 1 | direction), as in np_pol_key */
	__type(value, struct np_rules);
} np_pol_rules SEC(".maps");

/* Destinations the redirect may carry: value 1 (the cluster's pools).  Anything else, or a more specific
 * entry with value 0 (this host's own blocks: a local address that is not in np_locals, such as an
 * endpoint the programs do not know, must meet its ingress policy in the stack), goes to the stack after
 * policy, so NAT-outgoing (MASQUERADE in POSTROUTING, which a redirect would skip) stays correct. */
struct np_net_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct np_net_key);
	__type(value, __u8);
} np_fast_dsts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* endpoint id */
	__type(value, struct np_counters);
} np_counters SEC(".maps");

struct np_flow_key {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 echo; /* ICMP: NP_ECHO_REQUEST or NP_ECHO_REPLY (ports hold the echo id), else 0 */
	__u8 pad[2];
};

struct np_flow {
	__u64 seen_ns;
	__u32 gen;    /* np_config.policy_gen when the verdict was reached */
	__u8 verdict; /* NP_ACT_ALLOW or NP_ACT_DENY */
	__u8 orig;    /* 1: this key is the direction that opened the flow */
	__u8 pad[2];
};

struct np_config {
	__u32 policy_gen;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct np_flow_key);
	__type(value, struct np_flow);
} np_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct np_config);
} np_config SEC(".maps");

/* A flow idle this long is new again (conntrack's view too); the stamp is refreshed at most once a second. */
#define NP_FLOW_IDLE_NS (600ULL * 1000000000ULL)
#define NP_FLOW_STAMP_NS 1000000000ULL

/* ICMP echo is tracked like conntrack does: the echo id in the flow key's ports (request: sport = id,
 * reply: dport = id) and the kind in ``echo``, so a request in the other direction is a new flow, not a
 * reply to an earlier one. */
#define NP_ECHO_REQUEST 1
#define NP_ECHO_REPLY 2

struct np_pkt {
	__u8 family;
	__u8 proto;
	__u8 ports_ok; /* ports parsed (TCP/UDP, not a fragment) */
	__u8 l4_ok;    /* l4 known: ports parsed or a protocol without ports */
	__u8 echo;     /* NP_ECHO_* for ICMP echo, else 0 */
	__u16 sport;
	__u16 dport;
	__u8 src[16];
	__u8 dst[16];
	__u32 l3_off;
};

static __always_inline void map_v4(__u8 *out, __be32 a)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &a, 4);
}

/* Parse Ethernet + IPv4/IPv6 + ports.  Returns 0 when the packet is for the fast path, -1 otherwise. */
static __always_inline int parse(struct __sk_buff *skb, struct np_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 l4_off;

	if ((void *)(eth + 1) > end)
		return -1;
	p->l3_off = sizeof(*eth);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ihl != 5)
			return -1; /* options: leave to the stack */
		p->family = AF_INET;
		p->proto = ip->protocol;
		map_v4(p->src, ip->saddr);
		map_v4(p->dst, ip->daddr);
		if (ip->ttl <= 1)
			return -1; /* the stack sends time-exceeded */
		p->ports_ok = !(ip->frag_off & bpf_htons(0x3fff));
		l4_off = sizeof(*eth) + sizeof(*ip);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return -1;
		p->family = AF_INET6;
		p->proto = ip6->nexthdr;
		__builtin_memcpy(p->src, &ip6->saddr, 16);
		__builtin_memcpy(p->dst, &ip6->daddr, 16);
		if (ip6->hop_limit <= 1)
			return -1;
		/* link-local (ND, RA) and multicast belong to the stack */
		if ((p->src[0] == 0xfe && (p->src[1] & 0xc0) == 0x80) || p->dst[0] == 0xff)
			return -1;
		if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP && p->proto != IPPROTO_ICMPV6)
			return -1; /* extension headers: slow path */
		p->ports_ok = 1;
		l4_off = sizeof(*eth) + sizeof(*ip6);
	} else {
		return -1; /* ARP and everything else */
	}
	p->l4_ok = 1;
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) {
		__u16 *ports = data + l4_off;

		if (!p->ports_ok) {
			p->l4_ok = 0;
			return 0;
		}
		if ((void *)(ports + 2) > end)
			return -1;
		p->sport = bpf_ntohs(ports[0]);
		p->dport = bpf_ntohs(ports[1]);
	} else if ((p->proto == IPPROTO_ICMP && p->family == AF_INET) || p->proto == IPPROTO_ICMPV6) {
		__u8 *icmp = data + l4_off;
		__u8 req = p->family == AF_INET ? 8 : 128, rep = p->family == AF_INET ? 0 : 129;
		int whole = p->ports_ok; /* not a later fragment */

		p->ports_ok = 0;
		if (whole && (void *)(icmp + 8) <= end) {
			__u16 id = bpf_ntohs(*(__u16 *)(icmp + 4));

			if (icmp[0] == req) {
				p->echo = NP_ECHO_REQUEST;
				p->sport = id;
			} else if (icmp[0] == rep) {
				p->echo = NP_ECHO_REPLY;
				p->dport = id;
			}
		}
	} else {
		p->ports_ok = 0;
	}
	return 0;
}

static __always_inline void count(__u32 id, int what)
{
	struct np_counters *c = bpf_map_lookup_elem(&np_counters, &id);

	if (!c)
		return;
	switch (what) {
	case 0: c->allowed++; break;
	case 1: c->denied++; break;
	case 2: c->spoofed++; break;
	case 3: c->logged++; break;
	default: c->to_stack++; break;
	}
}

#if !defined(NP_NO_POLICY) && !defined(NP_CT_GATE)
struct np_eval {
	struct np_rules *rules;
	__u64 bits;
	__u32 id;
	__u8 proto;
	__u8 ports_ok;
	__u16 dport;
	int verdict;
};

static long eval_rule(__u64 i, void *ctx)
{
	struct np_eval *e = ctx;
	struct np_rule *r;
	int j, hit;

	if (i >= NP_MAX_RULES || i >= e->rules->n)
		return 1;
	r = &e->rules->r[i];
	if (!r->any_peer && !(e->bits & (1ULL << i)))
		return 0;
	if (r->proto && r->proto != e->proto)
		return 0;
	if (r->nports) {
		if (!e->ports_ok)
			return 0;
		hit = 0;
		for (j = 0; j < NP_MAX_PORT_RANGES; j++) {
			if (j >= r->nports)
				break;
			if (e->dport >= r->lo[j] && e->dport <= r->hi[j]) {
				hit = 1;
				break;
			}
		}
		if (!hit)
			return 0;
	}
	if (r->action == NP_ACT_LOG) {
		count(e->id, 3);
		return 0;
	}
	e->verdict = r->action;
	return 1;
}

/* The rules of the endpoint behind host veth ``ifindex`` for one direction, from its live slot: ALLOW,
 * DENY, or NONE (no endpoint or no rules: leave to the stack). */
static __always_inline int policy(__u32 ifindex, int dir, const __u8 *peer, __u8 proto, __u16 dport,
				  __u8 ports_ok)
{
	struct np_pol_key k = {};
	struct np_eval e = {};
	struct np_endpoint *ep;
	__u64 *bits;
	__u32 ep_dir, id;

	ep = bpf_map_lookup_elem(&np_endpoints, &ifindex);
	if (!ep)
		return NP_ACT_NONE;
	id = ep->id;
	ep_dir = id << 2 | (ep->pol_slot & 1) << 1 | dir;
	e.rules = bpf_map_lookup_elem(&np_pol_rules, &ep_dir);
	if (!e.rules)
		return NP_ACT_NONE;
	k.prefixlen = 32 + 128;
	k.ep_dir = bpf_htonl(ep_dir);
	__builtin_memcpy(k.addr, peer, 16);
	bits = bpf_map_lookup_elem(&np_pol_peers, &k);
	e.bits = bits ? *bits : 0;
	e.id = id;
	e.proto = proto;
	e.dport = dport;
	e.ports_ok = ports_ok;
	e.verdict = e.rules->default_action;
	bpf_loop(NP_MAX_RULES, eval_rule, &e, 0);
	return e.verdict;
}

/* A flow from src to dst (host veth ifindexes; either may be NP_REMOTE): the source's egress and the
 * destination's ingress rules on this host.  ALLOW only when every local end allows; NONE when an end has
 * no rules. */
static __always_inline int eval_flow(__u32 src_if, __u32 dst_if, const __u8 *src, const __u8 *dst, __u8 proto,
				     __u16 dport, __u8 ports_ok)
{
	int a = NP_ACT_ALLOW, b = NP_ACT_ALLOW;

	if (src_if != NP_REMOTE)
		a = policy(src_if, NP_DIR_EGRESS, dst, proto, dport, ports_ok);
	if (a == NP_ACT_DENY)
		return a;
	if (dst_if != NP_REMOTE)
		b = policy(dst_if, NP_DIR_INGRESS, src, proto, dport, ports_ok);
	if (a == NP_ACT_NONE || b == NP_ACT_NONE)
		return b == NP_ACT_DENY ? b : NP_ACT_NONE;
	return b;
}

#ifndef NP_NO_FLOWS
static __always_inline void flow_key(struct np_flow_key *k, struct np_pkt *p, int reverse)
{
	__builtin_memcpy(k->src, reverse ? p->dst : p->src, 16);
	__builtin_memcpy(k->dst, reverse ? p->src : p->dst, 16);
	k->sport = reverse ? p->dport : p->sport;
	k->dport = reverse ? p->sport : p->dport;
	k->proto = p->proto;
	k->echo = reverse && p->echo ? NP_ECHO_REQUEST + NP_ECHO_REPLY - p->echo : p->echo;
}
#endif

/* The verdict for a packet from src_if to dst_if, through the flow table unless built without it. */
static __always_inline int verdict(__u32 src_if, __u32 dst_if, struct np_pkt *p)
{
#ifdef NP_NO_FLOWS
	return eval_flow(src_if, dst_if, p->src, p->dst, p->proto, p->dport, p->ports_ok);
#else
	struct np_flow_key k = {};
	struct np_flow *f, nf = {};
	struct np_config *cfg;
	__u32 zero = 0, gen;
	__u64 now = bpf_ktime_get_ns();
	int v;

	cfg = bpf_map_lookup_elem(&np_config, &zero);
	gen = cfg ? cfg->policy_gen : 0;
	flow_key(&k, p, 0);
	f = bpf_map_lookup_elem(&np_flows, &k);
	if (f && now - f->seen_ns < NP_FLOW_IDLE_NS) {
		if (f->gen == gen) {
			if (now - f->seen_ns > NP_FLOW_STAMP_NS)
				f->seen_ns = now;
			return f->verdict;
		}
		if (!f->orig) {
			/* a reply after a policy change: re-check the direction that opened the flow */
			v = eval_flow(dst_if, src_if, p->dst, p->src, p->proto, p->sport, p->ports_ok);
			if (v == NP_ACT_NONE)
				return v;
			f->gen = gen;
			f->verdict = v;
			f->seen_ns = now;
			return v;
		}
	}
	v = eval_flow(src_if, dst_if, p->src, p->dst, p->proto, p->dport, p->ports_ok);
	if (v == NP_ACT_NONE)
		return v;
	nf.seen_ns = now;
	nf.gen = gen;
	nf.verdict = v;
	nf.orig = 1;
	bpf_map_update_elem(&np_flows, &k, &nf, BPF_ANY);
	if (v == NP_ACT_ALLOW) {
		flow_key(&k, p, 1); /* the same key, reversed: one key on the stack (its limit is 512 bytes) */
		nf.orig = 0;
		bpf_map_update_elem(&np_flows, &k, &nf, BPF_ANY);
	}
	return v;
#endif
}
#endif

#ifdef NP_CT_GATE
struct np_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u8 reserved[2];
};

extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *, struct bpf_sock_tuple *, __u32,
					 struct np_ct_opts *, __u32) __ksym;
extern void bpf_ct_release(struct nf_conn *) __ksym;

/* 1 when conntrack knows this flow, iptables accepted it (mark) and it is not NATed. */
static __always_inline int ct_accepted(struct __sk_buff *skb, struct np_pkt *p)
{
	struct bpf_sock_tuple t = {};
	struct np_ct_opts o = {.netns_id = -1, .l4proto = p->proto};
	struct nf_conn *ct;
	__u32 len;
	int ok;

	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return 0;
	if (!p->ports_ok)
		return 0;
	if (p->family == AF_INET) {
		__builtin_memcpy(&t.ipv4.saddr, p->src + 12, 4);
		__builtin_memcpy(&t.ipv4.daddr, p->dst + 12, 4);
		t.ipv4.sport = bpf_htons(p->sport);
		t.ipv4.dport = bpf_htons(p->dport);
		len = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(&t.ipv6.saddr, p->src, 16);
		__builtin_memcpy(&t.ipv6.daddr, p->dst, 16);
		t.ipv6.sport = bpf_htons(p->sport);
		t.ipv6.dport = bpf_htons(p->dport);
		len = sizeof(t.ipv6);
	}
	ct = bpf_skb_ct_lookup(skb, &t, len, &o, sizeof(o));
	if (!ct)
		return 0;
	ok = (ct->mark & NP_CT_ACCEPTED) && !(ct->status & (IPS_SRC_NAT | IPS_DST_NAT));
	bpf_ct_release(ct);
	return ok;
}
#endif

/* Allow (0) or deny (1) a packet from src_if to dst_if (NP_REMOTE: not on this host) by policy, or by the
 * conntrack gate; -1 hands it to the stack. */
static __always_inline int decide(struct __sk_buff *skb, __u32 src_if, __u32 dst_if, struct np_pkt *p)
{
#if defined(NP_CT_GATE)
	return ct_accepted(skb, p) ? 0 : -1;
#elif defined(NP_NO_POLICY)
	return 0;
#else
	if (!p->l4_ok)
		return -1; /* a fragment: iptables reassembles */
	switch (verdict(src_if, dst_if, p)) {
	case NP_ACT_ALLOW:
		return 0;
	case NP_ACT_DENY:
		return 1;
	default:
		return -1;
	}
#endif
}

static __always_inline int dec_ttl(struct __sk_buff *skb, struct np_pkt *p)
{
	if (p->family == AF_INET) {
		__u32 off = p->l3_off + offsetof(struct iphdr, ttl);
		__u8 ttl;
		__u16 old, new;

		if (bpf_skb_load_bytes(skb, off, &ttl, 1))
			return -1;
		/* ttl and protocol share a 16-bit word of the header checksum */
		old = bpf_htons((__u16)ttl << 8);
		new = bpf_htons((__u16)(ttl - 1) << 8);
		ttl--;
		if (bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check), old, new, 2))
			return -1;
		return bpf_skb_store_bytes(skb, off, &ttl, 1, 0);
	} else {
		__u32 off = p->l3_off + offsetof(struct ipv6hdr, hop_limit);
		__u8 hl;

		if (bpf_skb_load_bytes(skb, off, &hl, 1))
			return -1;
		hl--;
		return bpf_skb_store_bytes(skb, off, &hl, 1, 0);
	}
}

/* Into a local container: rewrite Ethernet to what its eth0 expects, then straight to the peer. */
static __always_inline int to_local(struct __sk_buff *skb, struct np_pkt *p, struct np_local *l)
{
	if (dec_ttl(skb, p))
		return TC_ACT_OK;
	if (bpf_skb_store_bytes(skb, 0, l->container_mac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, l->host_mac, ETH_ALEN, 0))
		return TC_ACT_OK;
	return bpf_redirect_peer(l->host_ifindex, 0);
}

static __always_inline int addr_is_endpoints(struct np_endpoint *ep, struct np_pkt *p)
{
	int i;

	if (p->family == AF_INET) {
		__be32 s;

		__builtin_memcpy(&s, p->src + 12, 4);
		for (i = 0; i < NP_MAX_ADDRS; i++)
			if (i < ep->n4 && ep->v4[i] == s)
				return 1;
		return 0;
	}
	for (i = 0; i < NP_MAX_ADDRS; i++) {
		__u64 a[2], b[2];

		if (i >= ep->n6)
			break;
		__builtin_memcpy(a, &ep->v6[i], 16);
		__builtin_memcpy(b, p->src, 16);
		if (a[0] == b[0] && a[1] == b[1])
			return 1;
	}
	return 0;
}

SEC("tc")
int from_container(struct __sk_buff *skb)
{
	struct bpf_fib_lookup fib = {};
	struct np_net_key fk = {};
	struct np_addr_key dk;
	struct np_endpoint *ep;
	struct np_local *l;
	struct np_pkt p = {};
	__u32 ifindex = skb->ifindex;
	__u8 *fast;
	int rc, d;

	ep = bpf_map_lookup_elem(&np_endpoints, &ifindex);
	if (!ep)
		return TC_ACT_OK;
	if (parse(skb, &p))
		return TC_ACT_OK;
	if (!addr_is_endpoints(ep, &p)) {
		count(ep->id, 2);
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(dk.addr, p.dst, 16);
	l = bpf_map_lookup_elem(&np_locals, &dk);
	d = decide(skb, ifindex, l ? l->host_ifindex : NP_REMOTE, &p);
	if (d > 0) {
		count(ep->id, 1);
		return TC_ACT_SHOT;
	}
	if (d < 0) {
		count(ep->id, 4);
		return TC_ACT_OK;
	}
	if (l) {
		/* both ends on this host: straight into the destination */
		count(ep->id, 0);
		return to_local(skb, &p, l);
	}
	fk.prefixlen = 128;
	__builtin_memcpy(fk.addr, p.dst, 16);
	fast = bpf_map_lookup_elem(&np_fast_dsts, &fk);
	if (!fast || !*fast) {
		count(ep->id, 4); /* outside the cluster: NAT-outgoing and the rest of the stack apply */
		return TC_ACT_OK;
	}

	fib.ifindex = ifindex;
	if (p.family == AF_INET) {
		fib.family = AF_INET;
		__builtin_memcpy(&fib.ipv4_src, p.src + 12, 4);
		__builtin_memcpy(&fib.ipv4_dst, p.dst + 12, 4);
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, p.src, 16);
		__builtin_memcpy(fib.ipv6_dst, p.dst, 16);
	}
	fib.l4_protocol = p.proto;
	fib.sport = bpf_htons(p.sport);
	fib.dport = bpf_htons(p.dport);
	/* tot_len 0: the kernel checks the skb against the egress MTU itself (is_skb_forwardable), which knows
	 * GSO; a tot_len of skb->len makes every GSO super-packet of a TCP sender FRAG_NEEDED, so the stack */
	fib.tot_len = 0;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (dec_ttl(skb, &p) ||
		    bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0))
			return TC_ACT_OK;
		count(ep->id, 0);
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		struct bpf_redir_neigh nh = {};

		if (dec_ttl(skb, &p))
			return TC_ACT_OK;
		if (p.family == AF_INET) {
			nh.nh_family = AF_INET;
			nh.ipv4_nh = fib.ipv4_dst;
		} else {
			nh.nh_family = AF_INET6;
			__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
		}
		count(ep->id, 0);
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	count(ep->id, 4);
	return TC_ACT_OK;
}

SEC("tc")
int to_container(struct __sk_buff *skb)
{
	struct np_net_key fk = {};
	struct np_addr_key dk;
	__u8 *fast;
	struct np_local *l;
	struct np_pkt p = {};
	int d;

	if (parse(skb, &p))
		return TC_ACT_OK;
	__builtin_memcpy(dk.addr, p.dst, 16);
	l = bpf_map_lookup_elem(&np_locals, &dk);
	if (!l)
		return TC_ACT_OK;
	d = decide(skb, NP_REMOTE, l->host_ifindex, &p);
	if (d > 0) {
		count(l->id, 1);
		return TC_ACT_SHOT;
	}
	fk.prefixlen = 128;
	__builtin_memcpy(fk.addr, p.src, 16);
	fast = bpf_map_lookup_elem(&np_fast_dsts, &fk);
	if (d < 0 || !fast || !*fast) {
		/* From outside the pools: its other direction goes through the stack (not in np_fast_dsts), so this
		 * one must too, or conntrack sees half a connection and iptables drops it as INVALID. */
		count(l->id, 4);
		return TC_ACT_OK;
	}
	count(l->id, 0);
	return to_local(skb, &p, l);
}

char LICENSE[] SEC("license") = "GPL";
