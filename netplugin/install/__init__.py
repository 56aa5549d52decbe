"""``netctl install`` / ``netctl uninstall``: the agent as a systemd service, the CNI plugin, a default config
file (files.py, systemd.py), and removing the kernel state the agent left behind (kernel.py)."""
