#!/usr/bin/env bash
# Install what netplugin needs on a Debian 12 machine (run as root; safe to run twice):
# the Debian packages of the real components the tests and the demo start, and a virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (it installs Debian packages; the tests and the demo run as root too)" >&2
  exit 1
fi

APT_PACKAGES=(etcd-server etcd-client bird2 ipset iptables iproute2 socat iputils-ping netcat-openbsd tcpdump
              docker.io podman containernetworking-plugins busybox-static iperf3 sockperf nftables python3-venv
              python3-pip golang-go golang-github-appc-cni-dev  # these two: tests build a libcni runtime (tests/libcni)
              clang llvm libbpf-dev bpftool  # the eBPF dataplane's tc programs (netplugin/kernel/bpf)
              prometheus)  # tests/functional/test_metrics.py scrapes the agents' metrics listeners

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  # Keep the packages' own services (a system etcd, dockerd, bird) from starting: netplugin starts its own,
  # inside network namespaces.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && created_policy=1
  fi
  trap '[ $created_policy = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
# BPF objects are built here, never committed; vmlinux.h comes from this kernel's BTF.
.venv/bin/python -m netplugin.kernel.bpf.build build/bpf --all-variants
echo "setup: ready (.venv)"
