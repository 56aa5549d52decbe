"""The one place that touches the kernel: entering namespaces (netns), rtnetlink (rtnl, netlink), netfilter
tables (netfilter) and ipsets (ipset). Imports only the standard library, pyroute2 and netplugin.errors."""
