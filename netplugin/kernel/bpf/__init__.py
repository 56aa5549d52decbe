"""The eBPF dataplane's kernel side: tc programs built from C at set-up, pinned maps, attach.

``build`` compiles ``progs/*.c`` with clang, ``maps`` talks to pinned maps through the bpf() syscall,
``loader`` loads an object once per host and attaches its programs to interfaces by netlink.
"""
