"""Small Markdown builders shared by the benchmark reports."""


def fmt_num(value, digits=3):
    """Three significant digits, no scientific notation for the ranges benchmarks produce: 15.2, 0.981, 1230."""
    if value is None:
        return "—"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10**digits:
        return f"{value:.0f}"
    decimals = 0
    while magnitude < 10 ** (digits - 1) and decimals < 6:
        magnitude *= 10
        decimals += 1
    return f"{value:.{decimals}f}"


def fmt_range(summary, digits=3):
    """'median (min–max)', or '—' when nothing was measured."""
    if summary is None:
        return "—"
    if summary.n == 1 or summary.lo == summary.hi:
        return fmt_num(summary.median, digits)
    return f"{fmt_num(summary.median, digits)} ({fmt_num(summary.lo, digits)}–{fmt_num(summary.hi, digits)})"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header, rows, align=None):
    """A GitHub Markdown table; ``align`` per column is 'l' or 'r' (default: first left, the rest right)."""
    if not header:
        raise ValueError("a table needs at least one column")
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells, the header has {len(header)}")
    align = align or ["l"] + ["r"] * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def demote_headings(text, levels=1):
    """Push every ATX heading down ``levels`` (``# T`` → ``## T``) outside fenced code, so a benchmark's own
    report nests under a section of the collected index."""
    out, fenced = [], False
    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and stripped.startswith("#"):
            hashes = len(stripped) - len(stripped.lstrip("#"))
            if hashes <= 6 and (len(stripped) == hashes or stripped[hashes] == " "):
                line = "#" * min(6, hashes + levels) + stripped[hashes:]
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")
