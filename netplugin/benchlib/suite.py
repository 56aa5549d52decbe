"""The pure half of ``scripts/bench_all.py``: which benchmarks exist, how to call them, how to collect them.

Conventions a benchmark script follows (all optional): it is ``scripts/bench_<name>.py``; it prints its result on
stdout (Markdown if it likes) and progress on stderr; it may write ``docs/benchmarks/<name>.md`` instead, which
then takes precedence; it accepts ``--quick`` if it has a short mode; it cleans up on SIGTERM.
"""

import os
import re

from netplugin.benchlib.markdown import demote_headings, table

# The order a reader expects (cheap and foundational first, the long data path run last); others follow by name.
PREFERRED_ORDER = ("ipam", "cni", "docker", "policy", "convergence", "datapath")
_NAME = re.compile(r"^bench_([a-z0-9_]+)\.py$")


def discover(scripts_dir):
    """``[(name, path)]`` of every ``bench_<name>.py`` except ``bench_all.py``, in PREFERRED_ORDER then by name."""
    found = {}
    for entry in sorted(os.listdir(scripts_dir)):
        m = _NAME.match(entry)
        if m and m.group(1) != "all":
            found[m.group(1)] = os.path.join(scripts_dir, entry)
    rank = {n: i for i, n in enumerate(PREFERRED_ORDER)}
    return [(n, found[n]) for n in sorted(found, key=lambda n: (rank.get(n, len(rank)), n))]


def accepts_quick(source_text):
    """True when the script defines a ``--quick`` option (read from its source: no need to run it)."""
    return re.search(r"""["']--quick["']""", source_text) is not None


def _is_markdown(text):
    lines = [line.strip() for line in text.splitlines()]
    has_table = any(re.match(r"^\|\s*:?-{3,}", line) for line in lines)
    has_heading = any(re.match(r"^#{1,6} ", line) for line in lines)
    return has_table or has_heading


def section_body(report_md=None, stdout="", limit_lines=200):
    """The body of one benchmark's section: its own Markdown report if it wrote one, else its stdout (as is when
    it is Markdown, else in a text block), headings pushed down two levels to nest under the section."""
    if report_md is not None:
        return demote_headings(report_md.strip(), 2)
    text = stdout.strip()
    if not text:
        return "_(no output)_"
    lines = text.splitlines()
    if len(lines) > limit_lines:
        lines = [f"… ({len(lines) - limit_lines} earlier lines left out)"] + lines[-limit_lines:]
        text = "\n".join(lines)
    if _is_markdown(text):
        return demote_headings(text, 2)
    return "```text\n" + text.replace("```", "ʼʼʼ") + "\n```"


def fmt_duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def render_index(runs, date, machine_line, quick, notes=()):
    """``docs/benchmarks/README.md``: when, where, a status table, then one section per benchmark.

    ``runs``: dicts with name, status ('ok', 'failed (rc=N)', 'timed out', 'interrupted'), seconds, quick
    (whether --quick was passed), body (from ``section_body``), report (file name of its own report or None).
    """
    out = [
        "# Benchmarks",
        "",
        f"Collected by `scripts/bench_all.py` on {date}{' with --quick' if quick else ''}.",
        f"Machine: {machine_line}.",
        "",
    ]
    out += list(notes) + ([""] if notes else [])
    rows = []
    for r in runs:
        report = f"[{r['report']}]({r['report']})" if r.get("report") else "below"
        rows.append(
            [
                f"[{r['name']}](#{r['name']})",
                r["status"],
                fmt_duration(r["seconds"]),
                "yes" if r.get("quick") else "no",
                report,
            ]
        )
    out.append(table(["benchmark", "status", "took (m:ss)", "--quick", "report"], rows))
    for r in runs:
        out += [
            "",
            f"## {r['name']}",
            "",
            f"`scripts/bench_{r['name']}.py{' --quick' if r.get('quick') else ''}`: {r['status']} in "
            f"{fmt_duration(r['seconds'])}.",
            "",
            r["body"],
        ]
    return "\n".join(out) + "\n"
