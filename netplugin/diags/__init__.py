"""``netctl diags``: one tarball of everything a bug report about one host needs (collect.py), with every secret
replaced by ``***`` (redact.py)."""
