"""``netctl check`` (records in etcd that agents skip) and ``netctl node health`` (the local agent's answer).

``check`` decodes every stored record the way the agents do (agent.view.decode, plus IPAM's own records), so what
it lists is exactly what every agent skips and reports in its health answer. Both exit 1 when something is wrong,
so they serve as probes in scripts.
"""

import sys

import click

from netplugin.agent.view import PREFIXES, decode
from netplugin.cli.output import emit, output_option
from netplugin.datastore import keys
from netplugin.datastore.models import BadRecord, Block, Handle
from netplugin.diags.health import agent_health

IPAM_RECORDS = {keys.BLOCKS: Block, keys.HANDLES: Handle}


def bad_records(ds):
    """[{"key", "revision", "error"}] of the records under netplugin's prefixes that do not decode."""
    out = []
    for prefix in PREFIXES + tuple(IPAM_RECORDS):
        for kv in ds.list(prefix):
            try:
                if prefix in IPAM_RECORDS:
                    IPAM_RECORDS[prefix].from_dict(kv.value)
                else:
                    decode(kv.key, kv.value)
            except BadRecord as e:
                out.append({"key": kv.key, "revision": kv.mod_revision, "error": e.msg})
    return out


@click.command("check")
@output_option
@click.pass_obj
def check(obj, fmt):
    """Records in etcd that no agent can use (each agent skips them, logs them once and reports them)."""
    rows = bad_records(obj.ds)
    emit(rows, fmt, ["key", "revision", "error"], empty="every record decodes")
    if rows:
        sys.exit(1)


def format_health(answer):
    """Plain lines for people: the verdict, problems, loops, skipped records, reconciler reports."""
    lines = [f"host {answer.get('host', '?')}: {'healthy' if answer.get('ok') else 'NOT HEALTHY'}"]
    lines += [f"  problem: {p}" for p in answer.get("problems") or ()]
    dp = answer.get("dataplane")
    if dp:
        lines.append(f"dataplane: {dp.get('active')} ({dp.get('reason')})")
    loops = answer.get("loops") or {}
    if loops:
        lines.append("loops (seconds since the last good round, failures in a row):")
        for name, st in sorted(loops.items()):
            err = f"  last error: {st['error']}" if st.get("error") else ""
            lines.append(f"  {name:<14} {st.get('age_s', 0):>8.1f}s  {st.get('failures', 0):>3}{err}")
    skipped = answer.get("skipped_records") or []
    lines.append(f"records skipped: {len(skipped)} now, {answer.get('skipped_total', 0)} since start")
    lines += [f"  {r['key']} (revision {r['revision']}): {r['error']}" for r in skipped]
    for name, report in sorted((answer.get("reports") or {}).items()):
        shown = {k: v for k, v in report.items() if k != "problems" and v not in (None, [], {})}
        if shown:
            lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    return "\n".join(lines)


@click.command("health")
@click.option("--run-dir", default="/run/netplugin", show_default=True, help="The local agent's run dir.")
@output_option
def node_health(run_dir, fmt):
    """This host's agent: healthy or not and why, its loops, the records it skipped, its parts' reports."""
    answer = agent_health(run_dir)
    if fmt == "table":
        click.echo(format_health(answer))
    else:
        emit(answer, fmt)
    if not answer.get("ok"):
        sys.exit(1)


COMMANDS = [check]
NODE_COMMANDS = [node_health]
