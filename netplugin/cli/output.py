"""Rendering of CLI results: aligned tables for people, JSON or YAML for scripts."""

import json

import click
import yaml


def emit(rows, fmt, columns=None, empty="(none)"):
    """Print ``rows`` (a list of dicts, or one dict) as a table, JSON or YAML."""
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if fmt == "yaml":
        click.echo(yaml.safe_dump(rows, sort_keys=True, default_flow_style=False).rstrip())
        return
    if isinstance(rows, dict):
        rows = [rows]
    if not rows:
        click.echo(empty)
        return
    columns = columns or list(rows[0].keys())
    table = [[c.upper() for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


output_option = click.option(
    "-o",
    "--output",
    "fmt",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
    help="Output format.",
)
