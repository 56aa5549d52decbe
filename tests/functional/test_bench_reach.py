"""The churn benchmark's many-target prober answers for many addresses at once, from real echo replies."""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = (
    f"import sys; sys.path.insert(0, {ROOT!r}); from netplugin.benchlib.reach import serve; "
    "serve(sys.stdin, sys.stdout)"
)


def test_prober_reports_every_answering_address_and_times_out_the_others(namespaces):
    a, b = namespaces.add(), namespaces.add()
    namespaces.link(a, b, "10.231.0.1/24", "10.231.0.2/24")
    for i in range(3, 8):
        subprocess.run(["ip", "-n", b, "addr", "add", f"10.231.0.{i}/24", "dev", "eth0"], check=True)
    p = subprocess.Popen(
        ["ip", "netns", "exec", a, sys.executable, "-I", "-c", RUNNER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        assert p.stdout.readline().strip() == "ready"
        began = time.monotonic()
        answering = [f"10.231.0.{i}" for i in range(2, 8)]
        silent = ["10.231.0.99", "10.231.0.100"]  # on the link, but nobody has them
        p.stdin.write("".join(f"{addr} 1.5\n" for addr in answering + silent))
        p.stdin.close()  # end of input: it stops once every target is settled
        lines = p.stdout.read().split("\n")
        assert p.wait(10) == 0
    finally:
        p.kill()
    ok = {parts[1]: float(parts[2]) for parts in (line.split() for line in lines) if parts[:1] == ["ok"]}
    assert sorted(ok) == sorted(answering)
    assert all(began <= t < began + 1.5 for t in ok.values())  # arrival on the caller's monotonic clock
    assert sorted(line.split()[1] for line in lines if line.startswith("timeout")) == sorted(silent)
    assert time.monotonic() - began < 5
