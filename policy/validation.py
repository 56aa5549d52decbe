"""Field-path errors for policy resources, with file lines when the input came from YAML.

Validation walks plain dicts (what etcd stores as JSON) and reports *every* problem it finds, each naming the
field path (``spec.ingress[0].ports[1]``). The YAML loader records the line of every node by path, so the same
problems can then be shown as ``policy.yaml:12: spec.ingress[0].ports[1]: "80x" is not a port or range``.
"""

from dataclasses import dataclass

from netplugin.errors import InvalidInput


def format_path(path):
    """('spec', 'ingress', 0, 'ports') -> 'spec.ingress[0].ports'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<document>"


def show(value):
    """A value as the user wrote it, quoted when it is text: "80x", 7, true."""
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


class FieldError(Exception):
    """One problem at one field; raised by leaf checks and collected by ``Problems``."""

    def __init__(self, path, msg, line=0):
        super().__init__(f"{format_path(path)}: {msg}")
        self.path = tuple(path)
        self.msg = msg
        self.line = line  # set only when the line is not the field's own (a duplicate key)


@dataclass(frozen=True)
class Problem:
    path: tuple
    msg: str
    source: str = ""
    line: int = 0

    def __str__(self):
        where = ""
        if self.source and self.line:
            where = f"{self.source}:{self.line}: "
        elif self.source:
            where = f"{self.source}: "
        return f"{where}{format_path(self.path)}: {self.msg}"


class PolicyValidationError(InvalidInput):
    """Every problem found in the input; ``str()`` is the first one, ``details`` lists all, one per line."""

    def __init__(self, problems):
        self.problems = list(problems)
        first = str(self.problems[0])
        more = len(self.problems) - 1
        msg = first + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
        super().__init__(msg, details="\n".join(str(p) for p in self.problems))


class Problems:
    """Collects FieldErrors so one pass reports all of them instead of the first only."""

    def __init__(self):
        self.items = []

    def add(self, path, msg):
        self.items.append(FieldError(path, msg))

    def attempt(self, fn, *args, **kw):
        """Call ``fn``; on FieldError record it and return None."""
        try:
            return fn(*args, **kw)
        except FieldError as err:
            self.items.append(err)
            return None

    def raise_if_any(self, marks=None, source=""):
        if self.items:
            raise PolicyValidationError(to_problems(self.items, marks, source))


def to_problems(errors, marks=None, source=""):
    """FieldErrors -> Problems, each with the line of its field (or of the nearest enclosing one)."""
    return [Problem(e.path, e.msg, source, e.line or line_of(marks, e.path)) for e in errors]


def line_of(marks, path):
    if not marks:
        return 0
    path = tuple(path)
    while True:
        if path in marks:
            return marks[path]
        if not path:
            return 0
        path = path[:-1]


def expect_mapping(value, path):
    if not isinstance(value, dict):
        raise FieldError(path, f"must be a mapping, not {show(value)}")
    return value


def expect_list(value, path):
    if not isinstance(value, list):
        raise FieldError(path, f"must be a list, not {show(value)}")
    return value


def expect_str(value, path, what="a string"):
    if not isinstance(value, str):
        hint = " (quote it)" if isinstance(value, (bool, int, float)) else ""
        raise FieldError(path, f"must be {what}, not {show(value)}{hint}")
    return value


def expect_bool(value, path):
    if not isinstance(value, bool):
        raise FieldError(path, f"must be true or false, not {show(value)}")
    return value


def expect_int(value, path):
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(path, f"must be a whole number, not {show(value)}")
    return value


def reject_unknown(mapping, allowed, path):
    """Unknown keys are errors: a typo ('form:' for 'from:') must not silently widen a policy."""
    errors = []
    for key in mapping:
        if key not in allowed:
            errors.append(
                FieldError(tuple(path) + (key,), f"unknown field (expected one of: {', '.join(sorted(allowed))})")
            )
    return errors
