"""libnetwork's IpamDriver on top of netplugin's IPAM: pools for Docker networks, addresses for endpoints.

Every Docker address gets its own IPAM handle ``docker.<host>.<random>``: the protocol's RequestAddress names
no endpoint, and a handle derived from anything Docker sends (the MAC, the address) could be shared by two
containers by mistake and so hand one address to both. ReleaseAddress names only the address, so the holder
is looked up in its block record and released only if it is a Docker handle of this host, guarded by the
allocation's sequence number: a release can never free an address a CNI container or another host holds, or
one re-allocated since (releasing the network's gateway, which we never allocate, is therefore harmless).

Gateways: containers always route via 169.254.1.1 / fe80::ecee:eeff:feee:eeee, so the pool's metadata names
that as the gateway and nothing is allocated for it. A ``--gateway`` is accepted, answered as asked and not
reserved (Docker shows it in ``network inspect``; the driver records it on the network).
"""

import logging
import uuid

import netaddr

from netplugin.datastore import keys
from netplugin.datastore.models import Block
from netplugin.dataplane import GATEWAY_V4, GATEWAY_V6
from netplugin.errors import AddressNotInPool, AlreadyExists, Conflict, InvalidInput, NotFound, PoolExhausted
from netplugin.ipam import blocks as blockmath
from netplugin.ipam.allocator import AssignRequest
from netplugin.docker.pools import ADDRESS_SPACE, PoolRef, host_prefix_of, place_subnet, pool_ref, usable_subnet

LOG = logging.getLogger(__name__)
GATEWAY_OPTION = "com.docker.network.gateway"  # Data key of RequestPool, and RequestAddressType's value
REQUEST_TYPE = "RequestAddressType"
MAC_OPTION = "com.docker.network.endpoint.macaddress"
HANDLE_PREFIX = "docker."


def pool_gateway(version):
    return f"{GATEWAY_V4}/32" if version == 4 else f"{GATEWAY_V6}/128"


class DockerIpam:
    def __init__(self, ipam, host):
        self.ipam = ipam
        self.host = host

    # --- pools ----------------------------------------------------------------------------------------------------

    @staticmethod
    def address_spaces():
        # One space: netplugin pools are cluster-wide whatever the network's scope.
        return {"LocalDefaultAddressSpace": ADDRESS_SPACE, "GlobalDefaultAddressSpace": ADDRESS_SPACE}

    def request_pool(self, address_space, pool, sub_pool, options, v6):
        """(PoolID, subnet, data) for ``docker network create [--subnet] [--ip-range]``."""
        if address_space != ADDRESS_SPACE:
            raise InvalidInput(f"address space {address_space!r} is not netplugin's ({ADDRESS_SPACE!r})")
        if sub_pool and not pool:
            raise InvalidInput("an ip range (SubPool) needs a subnet (Pool)")
        if not pool:
            ref = self._default_pool(6 if v6 else 4)
        else:
            usable_subnet(pool, "subnet")
            if sub_pool:
                usable_subnet(sub_pool, "ip range")
            cidr, create = place_subnet(pool, [p.cidr for p in self.ipam.list_pools()])
            ref = pool_ref(pool, cidr, sub_pool or None)
            if create:
                self._create_pool(ref.pool)
        LOG.info("event=docker.pool id=%s", ref.encode())
        return ref.encode(), ref.subnet, {GATEWAY_OPTION: pool_gateway(ref.version)}

    def _default_pool(self, version):
        pools = sorted(
            (p for p in self.ipam.list_pools() if p.version == version and not p.disabled),
            key=lambda p: netaddr.IPNetwork(p.cidr).first,
        )
        if not pools:
            raise PoolExhausted(
                f"no IPv{version} netplugin pool exists: add one (netctl pool add CIDR) or give "
                "docker network create a --subnet"
            )
        return PoolRef(pools[0].cidr, pools[0].cidr)

    def _create_pool(self, cidr):
        try:
            self.ipam.add_pool(cidr)
            LOG.info("event=docker.pool.created cidr=%s", cidr)
        except AlreadyExists:
            pass  # another host (or a concurrent create) made it first: the same pool is what we want

    def release_pool(self, pool_id):
        """Pools are cluster configuration shared with other hosts' networks: they stay (netctl pool rm)."""
        PoolRef.decode(pool_id)

    # --- addresses ------------------------------------------------------------------------------------------------

    def request_address(self, pool_id, address, options):
        """(address as CIDR, data). ``address`` empty: any free one (in the ip-range, if given)."""
        ref = PoolRef.decode(pool_id)
        options = options or {}
        if options.get(REQUEST_TYPE) == GATEWAY_OPTION:
            return self._gateway(ref, address), {}
        attrs = {"orchestrator": "docker", "pool_id": pool_id}
        if options.get(MAC_OPTION):
            attrs["mac"] = options[MAC_OPTION]
        if address:
            ip = _address(address)
            if ip not in netaddr.IPNetwork(ref.subnet):
                raise AddressNotInPool(f"address {ip} is not in the network's subnet {ref.subnet}")
            req = AssignRequest.static(str(ip), (ref.pool,))
        else:
            req = AssignRequest(ref.version, None, (ref.pool,), ref.within)
        handle = f"{HANDLE_PREFIX}{self.host}.{uuid.uuid4().hex[:16]}"
        got = self.ipam.assign(handle, self.host, [req], attrs=attrs)[0]
        LOG.info("event=docker.address.assigned address=%s handle=%s", got, handle)
        return host_prefix_of(got), {}

    @staticmethod
    def _gateway(ref, address):
        if not address:
            return pool_gateway(ref.version)
        ip = _address(address)
        if ip not in netaddr.IPNetwork(ref.subnet):  # also a gateway of the other family
            raise AddressNotInPool(f"gateway {ip} is not in the network's subnet {ref.subnet}")
        return f"{ip}/{netaddr.IPNetwork(ref.subnet).prefixlen}"

    def holder(self, address):
        """(handle, host, seq) of whoever holds ``address``, or None when it is free or in no pool."""
        ip = _address(address)
        for pool in self.ipam.list_pools():
            if ip in netaddr.IPNetwork(pool.cidr):
                kv = self.ipam.ds.get(keys.block(blockmath.block_for(pool.cidr, pool.block_size, ip)))
                if kv is None:
                    return None
                block = Block.from_dict(kv.value)
                alloc = block.allocations.get(str(block.ordinal(str(ip))))
                return (alloc.handle, alloc.host, alloc.seq) if alloc else None
        return None

    def release_address(self, pool_id, address):
        """Idempotent: an address that is free, or held by anyone but a Docker handle of ours, is left alone."""
        PoolRef.decode(pool_id)
        return self.release_host_address(address)

    def release_host_address(self, address):
        """ReleaseAddress without a pool id (the stale-endpoint collector): same guards."""
        held = self.holder(address)
        if held is None:
            return None
        handle, host, seq = held
        if not handle.startswith(HANDLE_PREFIX) or host != self.host:
            LOG.info("event=docker.address.release.skipped address=%s holder=%s host=%s", address, handle, host)
            return None
        try:
            self.ipam.release_address(str(_address(address)), seq=seq)
        except NotFound:
            return None
        except Conflict:
            if self.holder(address) == held:
                raise
            return None  # re-allocated to someone else meanwhile: nothing of ours left to release
        LOG.info("event=docker.address.released address=%s handle=%s", address, handle)
        return handle


def _address(value):
    try:
        return netaddr.IPNetwork(str(value)).ip
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise InvalidInput(f"{value!r} is not an IP address") from None
