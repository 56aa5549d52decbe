"""The README's demo: a 3-host BGP lab, two containers per host started through CNI, the ping matrix, then a
policy applied with netctl and the matrix again.

Each step is a function of the Lab, so later features (policy) add a step here rather than a new script.
"""

import os
import tempfile
import time

from netplugin.lab.lab import Lab
from netplugin.lab.plan import LabSpec
from netplugin.lab.report import format_matrix

ROLES = ("web", "db")


def start_containers(lab, per_host=2):
    """Containers web1, db1 on h1, web2, db2 on h2, ...; labelled role=web/db for policy to select."""
    for h in lab.plan.hosts:
        n = h.name[1:]
        for role in ROLES[:per_host]:
            rec = lab.run_container(h.name, f"{role}{n}", labels={"role": role})
            lab.out(f"  container {rec['name']:<6} on {h.name}: {rec['ip']:<15} role={role}")


def show_reachability(lab, timeout=30):
    started = time.monotonic()
    matrix = lab.wait_reachable(timeout=timeout)
    names = list(lab.containers())
    ok = sum(matrix.values())
    lab.out("")
    lab.out(f"ping matrix ({ok}/{len(matrix)} pairs reachable after {time.monotonic() - started:.1f}s):")
    lab.out(format_matrix(matrix, names))
    return ok == len(matrix)


DEMO_POLICY = """\
apiVersion: netplugin/v1
kind: Policy
metadata: {name: db-from-web-only}
spec:
  order: 100
  selector: {matchLabels: {role: db}}
  types: [Ingress]
  ingress:
    - action: allow
      from: [{selector: {matchLabels: {role: web}}}]
"""


def apply_policy(lab, timeout=10):
    """Databases accept traffic only from web containers: db->db pairs go dark, everything else stays."""
    lab.out("")
    lab.out("policy: only role=web may reach role=db")
    for line in DEMO_POLICY.splitlines():
        lab.out(f"    {line}")
    fd, path = tempfile.mkstemp(prefix="np-demo-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(DEMO_POLICY)
        lab.netctl("policy", "apply", "-f", path)
    finally:
        os.unlink(path)
    names = list(lab.containers())
    labels = {n: lab.container(n).get("labels", {}).get("role") for n in names}

    def expected(src, dst):
        return not (labels[dst] == "db" and labels[src] != "web")

    deadline = time.monotonic() + timeout
    while True:
        matrix = lab.ping_matrix()
        good = all(ok == expected(src, dst) for (src, dst), ok in matrix.items())
        if good or time.monotonic() > deadline:
            break
    lab.out(
        f"ping matrix with the policy ({sum(matrix.values())}/{len(matrix)} pairs reachable; "
        f"{'as the policy says' if good else 'NOT as the policy says'}):"
    )
    lab.out(format_matrix(matrix, names))
    return good


def run_demo(name="demo", hosts=3, per_host=2, down_after=False, out=print):
    """Build (replacing a previous demo lab of the same name), start containers, print the ping matrix.
    Returns True when every pair is reachable."""
    if Lab.exists(name):
        out(f"removing the previous lab {name}")
        Lab.destroy(name, out)
    lab = Lab.up(LabSpec(name=name, hosts=hosts), out=out)
    ok = False
    try:
        out("")
        out("containers (CNI ADD through the real plugin binary):")
        start_containers(lab, per_host)
        ok = show_reachability(lab) and apply_policy(lab)
    finally:
        if down_after or not ok:
            lab.down()
        else:
            out("")
            out(
                f"the lab stays up: 'python scripts/lab.py exec web1 -- ping -c1 "
                f"{lab.container('db2')['ip'] if 'db2' in lab.containers() else 'ADDRESS'}'; "
                f"'python scripts/lab.py down{'' if name == 'demo' else ' --name ' + name}' removes it"
            )
    return ok
