"""Errors an operator can act on.

Every expected failure is one of these: the CLI prints ``str(err)`` as one line and exits non-zero, the CNI
front door maps ``cni_code`` onto the spec's error codes, the Docker front door returns ``{"Err": str(err)}``.
Anything else is a bug and may carry a traceback.
"""


class NetpluginError(Exception):
    """Base of every expected failure. ``cni_code`` follows the CNI spec's well-known error codes."""

    cni_code = 999

    def __init__(self, msg, details=""):
        super().__init__(msg)
        self.msg = msg
        self.details = details


class InvalidInput(NetpluginError):
    """Malformed or inconsistent input (config, JSON, YAML, arguments)."""

    cni_code = 7  # "invalid network config"


class DatastoreUnavailable(NetpluginError):
    """etcd cannot be reached; the caller may try again later."""

    cni_code = 11  # "try again later"


class NotReady(NetpluginError):
    """The agent cannot finish the request now (its sync is failing or stalled); the caller may try again."""

    cni_code = 11


class Conflict(NetpluginError):
    """A compare-and-swap kept losing; transient, so the caller may try again."""

    cni_code = 11


class NotFound(NetpluginError):
    """The thing named does not exist (an endpoint, a container's netns): the spec's "container unknown"."""

    cni_code = 3


class AlreadyExists(NetpluginError):
    """Something by that name is there already (an interface in the container, a pool): the caller's request
    collides with existing state, which is no bug of ours (999) but our own code."""

    cni_code = 104


class PoolExhausted(NetpluginError):
    cni_code = 100  # our own codes start at 100, as the spec reserves 0-99


class AddressInUse(NetpluginError):
    cni_code = 101


class AddressNotInPool(NetpluginError):
    cni_code = 102


class InUse(NetpluginError):
    """A resource cannot be removed while something depends on it (a pool with allocations)."""

    cni_code = 999


class DataplaneError(NetpluginError):
    """A kernel operation failed; the message says which object and what was being done."""

    cni_code = 103


class NamespaceNotFound(NotFound, DataplaneError):
    """A network namespace named by path or name does not exist (we never create one)."""

    cni_code = 103
