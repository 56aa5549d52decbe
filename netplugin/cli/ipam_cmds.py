"""``netctl pool ...`` and ``netctl ipam ...``."""

import click

from netplugin.cli.output import emit, output_option
from netplugin.errors import InvalidInput
from netplugin.ipam.allocator import IPAM
from netplugin.ipam import reclaim


@click.group()
def pool():
    """Address pools that containers get addresses from."""


@pool.command("add")
@click.argument("cidr")
@click.option("--block-size", type=int, default=None, help="Prefix length of blocks (default /26, IPv6 /122).")
@click.option("--nat-outgoing", is_flag=True, help="Masquerade traffic leaving every pool.")
@output_option
@click.pass_obj
def pool_add(obj, cidr, block_size, nat_outgoing, fmt):
    """Add a pool; overlapping pools are refused."""
    p = IPAM(obj.ds).add_pool(cidr, block_size=block_size, nat_outgoing=nat_outgoing)
    emit(p.to_dict(), fmt)


@pool.command("set")
@click.argument("cidr")
@click.option("--nat-outgoing/--no-nat-outgoing", default=None, help="Masquerade traffic leaving every pool.")
@click.option(
    "--disable/--enable",
    "disabled",
    default=None,
    help="A disabled pool hands out nothing new; its allocated addresses stay.",
)
@output_option
@click.pass_obj
def pool_set(obj, cidr, nat_outgoing, disabled, fmt):
    """Change a pool's NAT-outgoing flag or disable/enable it."""
    if nat_outgoing is None and disabled is None:
        raise InvalidInput("nothing to change: give --nat-outgoing/--no-nat-outgoing or --disable/--enable")
    emit(IPAM(obj.ds).update_pool(cidr, nat_outgoing=nat_outgoing, disabled=disabled).to_dict(), fmt)


@pool.command("list")
@output_option
@click.pass_obj
def pool_list(obj, fmt):
    """List pools with their usage."""
    ipam = IPAM(obj.ds)
    usage = ipam.usage()
    rows = []
    for p in ipam.list_pools():
        used = sum(r["used"] for r in usage if r["pool"] == p.cidr)
        rows.append(
            {
                "cidr": p.cidr,
                "block_size": p.block_size,
                "blocks": sum(1 for r in usage if r["pool"] == p.cidr),
                "used": used,
                "nat_outgoing": p.nat_outgoing,
                "disabled": p.disabled,
            }
        )
    emit(rows, fmt, ["cidr", "block_size", "blocks", "used", "nat_outgoing", "disabled"], empty="no pools")


@pool.command("rm")
@click.argument("cidr")
@click.pass_obj
def pool_rm(obj, cidr):
    """Remove a pool; refused while any of its addresses is allocated."""
    IPAM(obj.ds).remove_pool(cidr)
    click.echo(f"removed pool {cidr}")


@click.group()
def ipam():
    """Inspect and repair address allocations."""


@ipam.command("show")
@output_option
@click.pass_obj
def ipam_show(obj, fmt):
    """Per block: the host it is affine to, used and free addresses."""
    emit(IPAM(obj.ds).usage(), fmt, ["block", "pool", "host", "used", "free"], empty="no blocks")


@ipam.command("check")
@output_option
@click.pass_obj
def ipam_check(obj, fmt):
    """Report leaks: allocations whose owner is gone, blocks of dead hosts. Exit 1 when anything is found."""
    findings = reclaim.check(obj.ds)
    if fmt == "table":
        if not findings:
            click.echo("ipam check: clean")
        else:
            emit(findings, fmt, ["kind", "address", "block", "handle", "host", "detail"])
    else:
        emit(findings, fmt)
    if findings:
        raise SystemExit(1)


@ipam.command("release")
@click.option("--ip", "address", help="Release this address, whoever holds it.")
@click.option("--handle", help="Release every address of this handle.")
@click.pass_obj
def ipam_release(obj, address, handle):
    """Release an address or a handle by hand."""
    if bool(address) == bool(handle):
        raise click.UsageError("give exactly one of --ip or --handle")
    allocator = IPAM(obj.ds)
    if address:
        owner = allocator.release_address(address)
        click.echo(f"released {address} (was held by {owner})")
    else:
        released = allocator.release_handle(handle)
        click.echo(f"released {', '.join(released)}" if released else f"handle {handle} holds nothing")


COMMANDS = [pool, ipam]
