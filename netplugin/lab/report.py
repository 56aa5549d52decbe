"""What a lab shows its operator: the summary after ``up``, ``status`` and the ping matrix as text. A mixin of
``Lab``, which owns ``plan``, ``state``, ``endpoints`` and the BGP introspection.
"""

from netplugin.lab import etcd, system


class Reporting:
    def summary(self):
        plan, spec = self.plan, self.plan.spec
        cluster_as = "64512"
        rows = [("HOST", "NAMESPACE", "RACK", "ADDRESS", "AS", "ROLE")]
        for h in plan.hosts:
            role = "route reflector" if h.route_reflector else ""
            rows.append((h.name, h.namespace, str(h.rack), h.address, str(h.as_number or cluster_as), role))
        lines = [
            f"lab {spec.name} is up ({spec.hosts} hosts, {spec.bgp_mode}) in "
            f"{self.state.data['timings'].get('total', 0):.1f}s",
            "",
        ]
        lines += text_table(rows)
        if plan.router:
            lines += [
                "",
                f"router {plan.router.namespace}: AS {plan.router.as_number}, "
                + ", ".join(f"rack {r}: {a}" for r, _, a in plan.router.interfaces),
            ]
        lines += [
            "",
            f"etcd:  {','.join(self.endpoints)}  (the same URL inside every host)",
            f"pool:  {spec.pool}",
            f"CNI:   {plan.cni_bin_dir}/netplugin with a conflist per host in {plan.state_dir}/hosts/H/net.d",
            f"state: {self.state.path}",
            "",
            "try:",
            f"  python scripts/lab.py run h1 web --label app=web{_name_opt(spec.name)}",
            f"  NETPLUGIN_ETCD_ENDPOINTS={','.join(self.endpoints)} netctl ipam show",
        ]
        if spec.routing == "bgp":
            lines.append(f"  netctl node status --run-dir {plan.hosts[0].run_dir}")
        lines.append(f"  python scripts/lab.py down{_name_opt(spec.name)}")
        return "\n".join(lines)

    def status(self):
        """A dict describing every host (agent and BIRD alive, sessions) and container."""
        from netplugin.routing.bird import BirdError

        procs = {p["role"]: p for p in self.state.data["processes"]}
        hosts = []
        for h in self.plan.hosts:
            killed = self.state.data["hosts"].get(h.name, {}).get("killed", False)
            agent = procs.get(f"agent {h.name}")
            row = {
                "host": h.name,
                "namespace": h.namespace,
                "address": h.address,
                "as": h.as_number,
                "route_reflector": h.route_reflector,
                "killed": killed,
                "agent": bool(agent and system.alive(agent["pid"], agent["start"])) and not killed,
            }
            if self.plan.spec.routing == "bgp" and not killed:
                try:
                    rows = self.bgp_sessions(h.name)
                    row["bgp"] = f"{sum(r.state == 'Established' for r in rows)}/{len(rows)} Established"
                except BirdError:
                    row["bgp"] = "BIRD not running"
            hosts.append(row)
        return {
            "name": self.name,
            "spec": self.plan.spec.to_dict(),
            "status": self.state.data["status"],
            "etcd": self.endpoints,
            "etcd_healthy": [etcd.healthy(u) for u in self.endpoints],
            "hosts": hosts,
            "containers": list(self.state.data["containers"].values()),
        }


def _name_opt(name):
    return "" if name == "demo" else f" --name {name}"


def text_table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_matrix(matrix, names):
    """The ping matrix as text: rows are sources, columns destinations."""
    names = sorted(names)
    rows = [["from \\ to"] + names]
    for s in names:
        rows.append([s] + ["-" if s == d else ("ok" if matrix.get((s, d)) else "FAIL") for d in names])
    return "\n".join(text_table(rows))
