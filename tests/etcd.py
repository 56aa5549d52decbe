"""Re-exported for the test suite: the one etcd helper lives in netplugin/lab/etcd.py, where the lab and the
benchmarks use it too."""
from netplugin.lab.etcd import EtcdCluster, EtcdServer, free_port

__all__ = ["EtcdCluster", "EtcdServer", "free_port"]
