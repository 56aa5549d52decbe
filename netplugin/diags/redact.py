"""Taking secrets out of diagnostics, pure functions so they are tested on their own.

Two nets, because a secret missed is a secret published with a bug report: by structure (every ``password``
field of etcd's JSON, BIRD's ``password "..."`` statements) and by value (each secret found that way, plus the
etcd password netctl logged in with, is then replaced wherever else it appears: logs, command output).
"""

import re

MASK = "***"
_BIRD_PASSWORD = re.compile(r'(\bpassword\s+)"((?:[^"\\]|\\.)*)"')


def redact_json(value, found):
    """``value`` with every field whose name contains "password" (any case) set to MASK; secrets go in ``found``."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, str) and "password" in k.lower() and v not in (None, ""):
                if isinstance(v, str):
                    found.add(v)
                out[k] = MASK
            else:
                out[k] = redact_json(v, found)
        return out
    if isinstance(value, list):
        return [redact_json(v, found) for v in value]
    return value


def redact_bird_config(text, found):
    """BIRD's config with each ``password "..."`` masked; the passwords go in ``found``."""

    def mask(m):
        found.add(m.group(2))
        return f'{m.group(1)}"{MASK}"'

    return _BIRD_PASSWORD.sub(mask, text)


def scrub(text, secrets):
    """``text`` with every occurrence of each secret (longest first, so one inside another goes whole) masked."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
