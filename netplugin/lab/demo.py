"""The README's demo: a 3-host BGP lab, two containers per host started through CNI, and the ping matrix.

Each step is a function of the Lab, so later features (policy) add a step here rather than a new script.
"""
import time

from netplugin.lab.lab import Lab, format_matrix
from netplugin.lab.plan import LabSpec

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
        ok = show_reachability(lab)
    finally:
        if down_after or not ok:
            lab.down()
        else:
            out("")
            out(f"the lab stays up: 'python scripts/lab.py exec web1 -- ping -c1 "
                f"{lab.container('db2')['ip'] if 'db2' in lab.containers() else 'ADDRESS'}'; "
                f"'python scripts/lab.py down{'' if name == 'demo' else ' --name ' + name}' removes it")
    return ok
