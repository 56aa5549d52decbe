"""The Docker plugin's front door: body decoding and error lines, as pure functions (no agent, no etcd)."""

import pytest

from netplugin.docker.app import ERR_HEAD, ERR_TAIL, _decode, _id, one_line
from netplugin.errors import InvalidInput


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
        (b'{"NetworkID": "\\ud800"}', "not valid Unicode"),
        (b'{"NetworkID": "\xff"}', "not valid JSON"),
        (b"{nope", "not valid JSON"),
        (b"[1]", "must be a JSON object, not list"),
        (b"NaN", "must be a JSON object, not float"),
    ],
)
def test_bodies_that_are_no_request(raw, why):
    body, error = _decode("NetworkDriver.Join", raw)
    assert body is None and why in error and error.startswith("NetworkDriver.Join: ")


@pytest.mark.parametrize("raw", [b"", b"  ", b"null", b"{}"])
def test_empty_bodies_are_empty_objects(raw):
    assert _decode("Plugin.Activate", raw) == ({}, None)


def test_error_lines_are_short_and_keep_the_hint():
    msg = one_line("endpoint address '" + "x" * 100_000 + "'\nis not an IP address")
    assert "\n" not in msg and len(msg) < ERR_HEAD + ERR_TAIL + 60
    assert msg.startswith("endpoint address 'xxx") and msg.endswith("is not an IP address")
    assert one_line("short") == "short"


@pytest.mark.parametrize("value", ["", "a/b", "../x", "x" * 129, "é", "a b", "-lead", "\x00"])
def test_ids_must_look_like_docker_ids(value):
    with pytest.raises(InvalidInput, match="NetworkID"):
        _id({"NetworkID": value}, "NetworkID")


def test_docker_ids_pass():
    for value in ("f" * 64, "net1", "n0", "ep_1.a-b"):
        assert _id({"EndpointID": value}, "EndpointID") == value
