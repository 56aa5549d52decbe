"""Re-exported for the test suite: the helpers live in netplugin/lab/dockerd.py, where the benchmarks use them too."""
from netplugin.lab.dockerd import DOCKER, IMAGE, DockerDaemon, DockerHost, busybox_tar

__all__ = ["DOCKER", "IMAGE", "DockerDaemon", "DockerHost", "busybox_tar"]
