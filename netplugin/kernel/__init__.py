"""The one place that touches the kernel: entering namespaces (netns), rtnetlink (rtnl, netlink), netfilter
tables (netfilter), ipsets (ipset) and conntrack entries (conntrack). Imports only the standard library,
pyroute2 and netplugin.errors."""
