"""BPF maps through the bpf() syscall (ctypes): create, open pinned, pin, lookup, update, delete, iterate.

One process (the agent) updates every endpoint's entries this way; nothing forks a ``bpftool`` per
endpoint.  Keys and values are ``bytes`` laid out as the C structs in ``progs/``; ``records`` packs them.
Per-CPU maps take and return one value per possible CPU (the kernel's layout, each slot 8-byte aligned).
"""

import ctypes
import errno
import os
import platform

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
BPF_OBJ_PIN, BPF_OBJ_GET = 6, 7
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_F_NO_PREALLOC = 1

MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LPM_TRIE, MAP_LRU_HASH = 1, 2, 5, 6, 11, 9
_PERCPU = {MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, 10}  # 10: LRU_PERCPU_HASH


class BpfError(OSError):
    """A bpf() call failed; the message says what was being done."""


class _Create(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


class _Elem(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _Obj(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _Info(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


_libc = None


def bpf(cmd, attr, what):
    """One bpf() syscall; returns its result or raises BpfError naming ``what``."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"{what}: no bpf() syscall number known for {platform.machine()}")
    # A full union bpf_attr is larger than any struct here; the kernel wants the rest zeroed.
    buf = ctypes.create_string_buffer(bytes(attr), 128)
    rc = _libc.syscall(nr, cmd, buf, ctypes.c_uint(128))
    if rc < 0:
        e = ctypes.get_errno()
        raise BpfError(e, f"{what}: {os.strerror(e)}")
    return rc


def possible_cpus():
    """Number of possible CPUs (the slots of a per-CPU value), from /sys/devices/system/cpu/possible."""
    with open("/sys/devices/system/cpu/possible") as f:
        n = 0
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            n = max(n, int(hi or lo) + 1)
        return n


def obj_get(path):
    """An fd for a pinned BPF object (map or program)."""
    p = os.fsencode(path)
    cbuf = ctypes.create_string_buffer(p)
    return bpf(BPF_OBJ_GET, _Obj(ctypes.addressof(cbuf), 0, 0), f"opening pinned BPF object {path}")


class _ProgInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8)]


def prog_id(fd):
    """The kernel's id of the program behind ``fd`` (what tc's filter dump and bpftool show)."""
    info = _ProgInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, _Info(fd, ctypes.sizeof(info), ctypes.addressof(info)), f"reading info of program {fd}")
    return info.id


def obj_pin(fd, path):
    p = os.fsencode(path)
    cbuf = ctypes.create_string_buffer(p)
    bpf(BPF_OBJ_PIN, _Obj(ctypes.addressof(cbuf), fd, 0), f"pinning BPF object at {path}")


class Map:
    """An open BPF map (owns its fd; use as a context manager or call close())."""

    def __init__(self, fd, name=""):
        self.fd = fd
        info = _MapInfo()
        bpf(
            BPF_OBJ_GET_INFO_BY_FD,
            _Info(fd, ctypes.sizeof(info), ctypes.addressof(info)),
            f"reading info of BPF map {name or fd}",
        )
        self.type, self.id = info.type, info.id
        self.key_size, self.value_size, self.max_entries = info.key_size, info.value_size, info.max_entries
        self.flags = info.map_flags
        self.name = name or info.name.decode()
        self.ncpus = possible_cpus() if self.type in _PERCPU else 0

    @classmethod
    def create(cls, map_type, key_size, value_size, max_entries, flags=0, name=""):
        attr = _Create(map_type, key_size, value_size, max_entries, flags, 0, 0, name.encode()[:15])
        return cls(bpf(BPF_MAP_CREATE, attr, f"creating BPF map {name!r}"), name)

    @classmethod
    def pinned(cls, path):
        return cls(obj_get(path), os.path.basename(path))

    def pin(self, path):
        obj_pin(self.fd, path)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    @property
    def _slot(self):
        """A per-CPU value's stride: each CPU's copy is 8-byte aligned."""
        return (self.value_size + 7) // 8 * 8

    @property
    def _vsize(self):
        """Bytes the kernel reads/writes for one value (per-CPU: one slot per CPU)."""
        return self._slot * self.ncpus if self.ncpus else self.value_size

    def _key(self, key):
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key of {len(key)} bytes, the map's keys are {self.key_size}")
        return ctypes.create_string_buffer(bytes(key), self.key_size)

    def _elem(self, cmd, key, value, flags, what):
        """One element command; False when the kernel says the key is not there (ENOENT)."""
        kbuf = self._key(key)
        attr = _Elem(self.fd, 0, ctypes.addressof(kbuf), ctypes.addressof(value) if value is not None else 0, flags)
        try:
            bpf(cmd, attr, f"{what} in BPF map {self.name}")
        except BpfError as e:
            if e.errno == errno.ENOENT and cmd != BPF_MAP_UPDATE_ELEM:
                return False
            raise
        return True

    def lookup(self, key):
        """The value for ``key`` (per-CPU maps: a list of one value per CPU), or None."""
        vbuf = ctypes.create_string_buffer(self._vsize)
        if not self._elem(BPF_MAP_LOOKUP_ELEM, key, vbuf, 0, "looking up a key"):
            return None
        return self._split(vbuf.raw)

    def update(self, key, value, flags=BPF_ANY):
        """Set ``key`` to ``value`` (per-CPU maps: one value, written to every CPU, or a list per CPU)."""
        if self.ncpus:
            values = value if isinstance(value, list) else [value] * self.ncpus
            raw = b"".join(bytes(v).ljust(self._slot, b"\0") for v in values)
        else:
            raw = bytes(value)
        if len(raw) != self._vsize or (not self.ncpus and len(value) != self.value_size):
            raise ValueError(f"map {self.name}: value of {len(value)} bytes, the map's values are {self.value_size}")
        vbuf = ctypes.create_string_buffer(raw, self._vsize)
        self._elem(BPF_MAP_UPDATE_ELEM, key, vbuf, flags, "updating a key")

    def delete(self, key):
        """Remove ``key``; False when it was not there."""
        return self._elem(BPF_MAP_DELETE_ELEM, key, None, 0, "deleting a key")

    def keys(self):
        """Every key (a snapshot walk: keys deleted meanwhile may restart the walk, as the kernel does)."""
        out = []
        nbuf = ctypes.create_string_buffer(self.key_size)
        prev = None
        while True:
            kbuf = self._key(prev) if prev is not None else None
            attr = _Elem(self.fd, 0, ctypes.addressof(kbuf) if kbuf is not None else 0, ctypes.addressof(nbuf), 0)
            try:
                bpf(BPF_MAP_GET_NEXT_KEY, attr, f"listing keys of BPF map {self.name}")
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return out
                raise
            prev = nbuf.raw
            out.append(prev)

    def items(self):
        """(key, value) pairs; a key gone between listing and lookup is skipped."""
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def _split(self, raw):
        if not self.ncpus:
            return raw
        return [raw[i * self._slot : i * self._slot + self.value_size] for i in range(self.ncpus)]
