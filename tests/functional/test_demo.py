"""The README's demo, end to end: a 3-host BGP lab, containers through CNI, policy through netctl."""

import pytest

from netplugin.lab.demo import run_demo
from netplugin.lab.lab import Lab

pytestmark = pytest.mark.functional


def test_demo_runs_and_cleans_up():
    lines = []
    try:
        assert run_demo("tdemo", hosts=3, per_host=2, down_after=True, out=lines.append), "\n".join(lines)
    finally:
        Lab.destroy("tdemo", lambda _line: None)
    text = "\n".join(lines)
    assert "30/30 pairs reachable" in text
    assert "24/30 pairs reachable; as the policy says" in text
    assert not Lab.exists("tdemo")
