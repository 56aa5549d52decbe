"""BGP introspection of a lab: how many sessions each host should have in its topology, what BIRD says it has,
and a bounded wait for all of them to be Established. A mixin of ``Lab``, which owns ``plan`` and ``live_hosts``.
"""

import os
import time

from netplugin.lab.system import LabError


class BgpSessions:
    def expected_sessions(self, host):
        """How many BGP sessions ``host`` should have Established in this lab's topology."""
        plan, spec = self.plan, self.plan.spec
        others = [h for h in self.live_hosts() if h.name != host.name]
        if plan.router:
            return 1
        if spec.mesh:
            return len(others)
        if host.route_reflector:
            return len(others)
        return sum(1 for h in others if h.route_reflector)

    def bgp_sessions(self, host_name):
        """BgpStatusRows of a host's BIRD (the same rows ``netctl node status`` shows)."""
        from netplugin.routing.bird import bgp_status

        h = self.plan.host(host_name)
        return bgp_status(h.bird_socket)

    def router_sessions(self):
        from netplugin.routing.bird import bgp_status

        if not self.plan.router:
            return []
        return bgp_status(os.path.join(self.plan.router.run_dir, "bird", "bird.ctl"))

    def established(self, host_name):
        from netplugin.routing.bird import BirdError

        try:
            return sum(1 for r in self.bgp_sessions(host_name) if r.state == "Established")
        except BirdError:
            return 0

    def wait_established(self, timeout):
        """Poll every host's BIRD (and the router's) until each has all its sessions Established."""
        from netplugin.routing.bird import BirdError

        started = time.monotonic()
        deadline = started + timeout
        pending = {h.name: h for h in self.live_hosts()}
        router_done = self.plan.router is None
        while True:
            for name in list(pending):
                if self.established(name) >= self.expected_sessions(pending[name]):
                    del pending[name]
            if not router_done:
                try:
                    up = sum(1 for r in self.router_sessions() if r.state == "Established")
                except BirdError:
                    up = 0
                router_done = up >= len(self.live_hosts())
            if not pending and router_done:
                break
            if time.monotonic() > deadline:
                detail = ", ".join(
                    f"{n}: {self.established(n)}/{self.expected_sessions(h)}" for n, h in sorted(pending.items())
                )
                raise LabError(
                    f"BGP did not converge within {timeout:.0f}s ({detail or 'router sessions down'}); "
                    f"see {self.plan.state_dir}/hosts/*/bird/bird.log"
                )
            time.sleep(0.25)
        total = sum(self.expected_sessions(h) for h in self.live_hosts())
        self.out(f"BGP: {total} sessions Established after {time.monotonic() - started:.1f}s")
