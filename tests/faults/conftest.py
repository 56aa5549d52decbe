"""Fixtures of the fault suite. The fuzz counts are an option: a short run by default, the long one by env var."""

import os

import pytest

DEFAULT_FUZZ_EXAMPLES = 300


@pytest.fixture
def fuzz_examples():
    """How many generated examples each fuzz test runs (``NETPLUGIN_FUZZ_EXAMPLES=10000`` for the long run)."""
    return int(os.environ.get("NETPLUGIN_FUZZ_EXAMPLES", DEFAULT_FUZZ_EXAMPLES))
