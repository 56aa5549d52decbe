"""IPAM's pure IP arithmetic: blocks of a pool, ordinals, ranges (Docker --ip-range), IPv4 and IPv6 alike."""

import netaddr
import pytest

from netplugin.datastore.models import Allocation, Block
from netplugin.ipam import blocks


@pytest.mark.parametrize(
    "pool,size,address,expected",
    [
        ("10.0.0.0/16", 26, "10.0.0.0", "10.0.0.0/26"),
        ("10.0.0.0/16", 26, "10.0.0.63", "10.0.0.0/26"),
        ("10.0.0.0/16", 26, "10.0.0.64", "10.0.0.64/26"),
        ("10.0.0.0/16", 26, "10.0.255.255", "10.0.255.192/26"),
        ("10.0.0.0/16", 32, "10.0.3.7", "10.0.3.7/32"),
        ("fd00::/112", 122, "fd00::3f", "fd00::/122"),
        ("fd00::/112", 122, "fd00::40", "fd00::40/122"),
        ("fd00::/112", 122, "fd00::ffff", "fd00::ffc0/122"),
    ],
)
def test_block_for(pool, size, address, expected):
    assert blocks.block_for(pool, size, address) == expected
    assert netaddr.IPAddress(address) in netaddr.IPNetwork(expected)


def test_iter_blocks_covers_the_pool_in_order_without_gaps():
    got = list(blocks.iter_blocks("10.1.0.0/24", 26))
    assert got == ["10.1.0.0/26", "10.1.0.64/26", "10.1.0.128/26", "10.1.0.192/26"]
    big = list(blocks.iter_blocks("10.0.0.0/16", 26))
    assert len(big) == 1024 and len(set(big)) == 1024
    assert sum(netaddr.IPNetwork(b).size for b in big) == 65536
    assert big == sorted(big, key=lambda c: netaddr.IPNetwork(c).first)


def test_iter_blocks_ipv6():
    got = list(blocks.iter_blocks("fd00::/120", 122))
    assert got == ["fd00::/122", "fd00::40/122", "fd00::80/122", "fd00::c0/122"]
    assert len(list(blocks.iter_blocks("fd00:1::/112", 122))) == 1024


def test_iter_blocks_pool_of_one_block():
    assert list(blocks.iter_blocks("10.2.0.0/26", 26)) == ["10.2.0.0/26"]
    assert list(blocks.iter_blocks("10.2.0.0/28", 28)) == ["10.2.0.0/28"]


@pytest.mark.parametrize(
    "within,expected",
    [
        ("10.1.0.64/26", ["10.1.0.64/26"]),  # exactly one block
        ("10.1.0.128/25", ["10.1.0.128/26", "10.1.0.192/26"]),  # two blocks
        ("10.1.0.80/28", ["10.1.0.64/26"]),  # smaller than a block: the block that holds it
        ("10.1.0.0/16", ["10.1.0.0/26", "10.1.0.64/26", "10.1.0.128/26", "10.1.0.192/26"]),  # larger than the pool
    ],
)
def test_iter_blocks_within_a_range(within, expected):
    assert list(blocks.iter_blocks("10.1.0.0/24", 26, within)) == expected


def test_iter_blocks_within_ipv6_range():
    assert list(blocks.iter_blocks("fd00::/112", 122, "fd00::80/121")) == ["fd00::80/122", "fd00::c0/122"]
    assert list(blocks.iter_blocks("fd00::/112", 122, "fd00::90/124")) == ["fd00::80/122"]


def test_iter_blocks_within_a_disjoint_range_is_empty():
    assert list(blocks.iter_blocks("10.1.0.0/24", 26, "10.2.0.0/24")) == []
    assert list(blocks.iter_blocks("10.1.0.0/24", 26, "10.2.0.0/28")) == []  # smaller than a block, elsewhere
    assert list(blocks.iter_blocks("fd00::/112", 122, "10.1.0.0/28")) == []  # another family


def test_ordinal_range():
    assert blocks.ordinal_range("10.0.0.0/26") == range(64)
    assert blocks.ordinal_range("10.0.0.0/26", "10.0.0.16/28") == range(16, 32)
    assert blocks.ordinal_range("10.0.0.64/26", "10.0.0.0/24") == range(64)
    assert blocks.ordinal_range("10.0.0.64/26", "10.0.0.0/26") == range(0)
    assert blocks.ordinal_range("10.0.0.0/26", "10.0.0.60/30") == range(60, 64)
    assert blocks.ordinal_range("fd00::/122", "fd00::20/123") == range(32, 64)


def _block(cidr, taken=()):
    return Block(
        cidr=cidr,
        pool=cidr,
        affinity="h",
        allocations={str(o): Allocation("x", "h", i + 1) for i, o in enumerate(taken)},
    )


def test_first_free():
    assert blocks.first_free(_block("10.0.0.0/26")) == 0
    assert blocks.first_free(_block("10.0.0.0/26", [0, 1, 3])) == 2
    assert blocks.first_free(_block("10.0.0.0/30", [0, 1, 2, 3])) is None
    assert blocks.first_free(_block("fd00::/122", range(63))) == 63


def test_first_free_within():
    b = _block("10.0.0.0/26", [16, 17])
    assert blocks.first_free(b, "10.0.0.16/28") == 18
    assert blocks.first_free(_block("10.0.0.0/26", range(16, 32)), "10.0.0.16/28") is None
    assert blocks.first_free(b, "10.0.1.0/24") is None


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ("10.0.0.0/16", "10.0.5.0/24", True),
        ("10.0.5.0/24", "10.0.0.0/16", True),
        ("10.0.0.0/24", "10.0.0.0/24", True),
        ("10.0.0.0/24", "10.0.1.0/24", False),  # adjacent
        ("10.0.0.0/24", "10.0.0.255/32", True),  # last address
        ("fd00::/64", "fd00::/112", True),
        ("fd00::/64", "fd01::/64", False),
        ("10.0.0.0/8", "::/0", False),  # families never overlap
    ],
)
def test_overlaps(a, b, expected):
    assert blocks.overlaps(a, b) is expected


def test_host_prefix():
    assert blocks.host_prefix("10.0.0.5") == "10.0.0.5/32"
    assert blocks.host_prefix("fd00::5") == "fd00::5/128"


def test_default_block_sizes_hold_64_addresses():
    assert 2 ** (32 - blocks.DEFAULT_BLOCK_SIZE[4]) == 64
    assert 2 ** (128 - blocks.DEFAULT_BLOCK_SIZE[6]) == 64
