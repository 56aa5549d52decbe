"""Secrets out of diagnostics: by structure (password fields, BIRD password statements) and then by value."""

from netplugin.diags.redact import MASK, redact_bird_config, redact_json, scrub


def test_password_fields_are_masked_at_any_depth_and_remembered():
    found = set()
    doc = {"name": "tor", "password": "s1", "nested": [{"bgpPassword": "s2", "x": 1}], "Password": None}
    assert redact_json(doc, found) == {
        "name": "tor",
        "password": MASK,
        "nested": [{"bgpPassword": MASK, "x": 1}],
        "Password": None,
    }
    assert found == {"s1", "s2"}


def test_bird_password_statements_are_masked_with_escaped_quotes():
    found = set()
    text = 'protocol bgp tor {\n  neighbor 10.0.0.1 as 65010;\n  password "a\\"b c";\n}\n'
    out = redact_bird_config(text, found)
    assert out == 'protocol bgp tor {\n  neighbor 10.0.0.1 as 65010;\n  password "***";\n}\n'
    assert found == {'a\\"b c'}


def test_scrub_masks_every_occurrence_longest_secret_first():
    assert scrub("pw=abc abcdef x", {"abc", "abcdef", ""}) == f"pw={MASK} {MASK} x"
    assert scrub("nothing here", set()) == "nothing here"
