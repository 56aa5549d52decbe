"""``scripts/lab.py``: build, use and remove multi-host labs from the command line.

Every expected failure is one line on stderr and exit status 1. Ctrl-C or SIGTERM during ``up`` (or ``demo``)
removes whatever was built so far.
"""

import argparse
import json
import os
import signal
import sys

from netplugin.errors import NetpluginError

DEFAULT_NAME = os.environ.get("NETPLUGIN_LAB", "demo")


def _labels(values):
    out = {}
    for item in values or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise argparse.ArgumentTypeError(f"label {item!r} must be KEY=VALUE")
        out[k] = v
    return out


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--name",
        default=DEFAULT_NAME,
        help="Lab name (namespaces are lab-NAME-*; default %(default)s, env NETPLUGIN_LAB).",
    )
    p = argparse.ArgumentParser(prog="lab.py", description="Multi-host netplugin labs in network namespaces.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="Build a lab: etcd, fabric, BIRD and an agent per host.")
    up.add_argument("--hosts", type=int, default=3)
    up.add_argument("--racks", type=int, default=1, help="L2 segments joined by a BGP router (default 1).")
    up.add_argument("--etcd-members", type=int, choices=(1, 3), default=1)
    up.add_argument("--routing", choices=("bgp", "direct"), default="bgp")
    up.add_argument("--route-reflectors", type=int, default=0, help="K hosts become reflectors; mesh off.")
    up.add_argument("--pool", default=None, help="Container address pool (default 10.244.0.0/16).")
    up.add_argument(
        "--dataplane", choices=("iptables", "bpf"), default="iptables", help="The agents' dataplane (default iptables)."
    )
    up.add_argument("--timeout", type=float, default=None, help="Seconds to wait for BGP to converge.")

    run = sub.add_parser("run", parents=[common], help="Start a container on a host through CNI ADD.")
    run.add_argument("host")
    run.add_argument("container")
    run.add_argument("--ip", help="Ask for this address.")
    run.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable).")

    rm = sub.add_parser("rm", parents=[common], help="Remove a container (CNI DEL).")
    rm.add_argument("container")

    ex = sub.add_parser("exec", parents=[common], help="Run a command in a container: exec NAME -- CMD ...")
    ex.add_argument("container")
    ex.add_argument("argv", nargs="*", help="The command (after --).")

    st = sub.add_parser("status", parents=[common], help="Hosts, BGP sessions, containers.")
    st.add_argument("--json", action="store_true")

    sub.add_parser("ping", parents=[common], help="Ping matrix between all containers.")
    sub.add_parser("down", parents=[common], help="Remove the lab: processes, namespaces, files.")
    sub.add_parser("list", help="Labs that exist.")

    demo = sub.add_parser("demo", parents=[common], help="3 hosts, 2 containers each, the ping matrix.")
    demo.add_argument("--hosts", type=int, default=3)
    keep = demo.add_mutually_exclusive_group()
    keep.add_argument("--down-after", action="store_true", help="Remove the lab at the end.")
    keep.add_argument("--keep", action="store_true", help="Leave the lab up at the end (the default).")
    return p


def _interrupt_on_term():
    """SIGTERM behaves like Ctrl-C, so ``up`` cleans up in both cases."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if argv[:1] == ["exec"] and "--" in argv:  # everything after "--" is the container's command, options too
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if args.command == "exec":
        args.argv = command or args.argv
    _interrupt_on_term()
    try:
        return _dispatch(args)
    except NetpluginError as e:
        print(f"lab: error: {e.msg}", file=sys.stderr)
        return 1
    except argparse.ArgumentTypeError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return 130


def _dispatch(args):
    from netplugin.lab.lab import Lab
    from netplugin.lab.plan import DEFAULT_POOL, LabSpec
    from netplugin.lab.report import format_matrix

    out = print
    if args.command == "list":
        for name in Lab.names():
            print(name)
        return 0
    if args.command == "up":
        spec = LabSpec(
            name=args.name,
            hosts=args.hosts,
            racks=args.racks,
            etcd_members=args.etcd_members,
            routing=args.routing,
            route_reflectors=args.route_reflectors,
            pool=args.pool or DEFAULT_POOL,
            dataplane=args.dataplane,
        )
        Lab.up(spec, out=out, converge_timeout=args.timeout)
        return 0
    if args.command == "demo":
        from netplugin.lab.demo import run_demo

        return 0 if run_demo(args.name, hosts=args.hosts, down_after=args.down_after, out=out) else 1
    if args.command == "down":
        if not Lab.destroy(args.name, out):
            print(f"lab {args.name} is not up; nothing to remove")
        return 0

    lab = Lab.open(args.name, out=out)
    if args.command == "run":
        rec = lab.run_container(args.host, args.container, ip=args.ip, labels=_labels(args.label))
        labels = " ".join(f"{k}={v}" for k, v in sorted(rec["labels"].items()))
        print(f"container {rec['name']} on {rec['host']}: {rec['ip']} (netns {rec['netns']}) {labels}".rstrip())
        return 0
    if args.command == "rm":
        lab.remove_container(args.container)
        print(f"container {args.container} removed")
        return 0
    if args.command == "exec":
        argv = args.argv
        if not argv:
            print("lab: error: exec needs a command: exec NAME -- CMD ...", file=sys.stderr)
            return 2
        return lab.exec(args.container, argv, capture=False).returncode
    if args.command == "ping":
        names = list(lab.containers())
        if len(names) < 2:
            print("fewer than two containers: nothing to ping")
            return 0
        matrix = lab.ping_matrix(names)
        print(format_matrix(matrix, names))
        return 0 if all(matrix.values()) else 1
    if args.command == "status":
        st = lab.status()
        if args.json:
            print(json.dumps(st, indent=2, sort_keys=True))
            return 0
        _print_status(st)
        return 0
    raise AssertionError(args.command)


def _print_status(st):
    from netplugin.lab.report import text_table

    spec = st["spec"]
    health = ", ".join(f"{u} ({'ok' if ok else 'DOWN'})" for u, ok in zip(st["etcd"], st["etcd_healthy"]))
    print(
        f"lab {st['name']} ({st['status']}): {spec['hosts']} hosts, {spec['racks']} rack(s), "
        f"routing {spec['routing']}, etcd {health}"
    )
    rows = [("HOST", "ADDRESS", "AS", "RR", "AGENT", "BGP")]
    for h in st["hosts"]:
        agent = "killed" if h["killed"] else ("running" if h["agent"] else "DOWN")
        rows.append(
            (
                h["host"],
                h["address"],
                str(h["as"] or "cluster"),
                "yes" if h["route_reflector"] else "",
                agent,
                h.get("bgp", "-"),
            )
        )
    print("\n".join(text_table(rows)))
    if st["containers"]:
        rows = [("CONTAINER", "HOST", "IP", "LABELS")]
        for c in sorted(st["containers"], key=lambda c: c["name"]):
            rows.append((c["name"], c["host"], c["ip"] or "", ",".join(f"{k}={v}" for k, v in c["labels"].items())))
        print()
        print("\n".join(text_table(rows)))
