"""The lab's state file: what was made and which processes run, so later commands (and ``down`` after a crash
half-way through ``up``) find everything.

Everything is recorded *before* it is made (a namespace name, a directory) or right after it starts (a pid with
its start time), and the file is rewritten atomically after each change. Commands that change the lab hold an
exclusive lock on ``<state dir>/lock`` so two ``run`` commands do not lose each other's containers.
"""

import contextlib
import fcntl
import json
import os
import tempfile
import time

from netplugin.lab.system import LabError

STATE_FILE = "state.json"
LOCK_FILE = "lock"
VERSION = 1


class LabState:
    def __init__(self, path, data):
        self.path = path
        self.data = data

    @classmethod
    def create(cls, state_dir, name):
        """A new, empty state in a directory that must not exist yet."""
        try:
            os.makedirs(os.path.dirname(state_dir), exist_ok=True)
            os.mkdir(state_dir, 0o700)
        except FileExistsError:
            raise LabError(f"lab {name} already exists ({state_dir}): use it, or remove it with 'down'") from None
        state = cls(
            os.path.join(state_dir, STATE_FILE),
            {
                "version": VERSION,
                "name": name,
                "status": "building",
                "created": time.time(),
                "spec": {},
                "etcd": {"members": [], "endpoints": []},
                "namespaces": [],
                "processes": [],
                "dirs": [],
                "mounts": [],
                "hosts": {},
                "containers": {},
                "timings": {},
            },
        )
        state.save()
        return state

    @classmethod
    def load(cls, state_dir, name):
        path = os.path.join(state_dir, STATE_FILE)
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise LabError(f"lab {name} is not up (no {path})") from None
        except (OSError, ValueError) as e:
            raise LabError(f"reading lab state {path}: {e}") from None
        if data.get("version") != VERSION:
            raise LabError(f"lab state {path} has version {data.get('version')!r}, expected {VERSION}")
        return cls(path, data)

    @property
    def dir(self):
        return os.path.dirname(self.path)

    def save(self):
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # --- recording ------------------------------------------------------------------------------------------------

    def add_namespace(self, ns):
        if ns not in self.data["namespaces"]:
            self.data["namespaces"].append(ns)
            self.save()

    def forget_namespace(self, ns):
        if ns in self.data["namespaces"]:
            self.data["namespaces"].remove(ns)
            self.save()

    def add_dir(self, path):
        if path not in self.data["dirs"]:
            self.data["dirs"].append(path)
            self.save()

    def add_mount(self, path):
        """A filesystem mounted for the lab (its bpffs); saved at once, like a namespace."""
        mounts = self.data.setdefault("mounts", [])
        if path not in mounts:
            mounts.append(path)
        self.save()

    def add_process(self, role, pid, started, save=True):
        self.data["processes"].append({"role": role, "pid": pid, "start": started})
        if save:
            self.save()

    def processes(self, role=None):
        return [p for p in self.data["processes"] if role is None or p["role"] == role]


@contextlib.contextmanager
def locked(state_dir, what):
    """Exclusive lock on the lab for ``what``; waits up to 60 s for another command to finish."""
    path = os.path.join(state_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        raise LabError(f"{what}: the lab is not up (no {state_dir})") from None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"{what}: another lab command holds {path} for over 60 s") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)
