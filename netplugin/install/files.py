"""Files ``netctl install`` writes and ``netctl uninstall`` removes, recorded in a manifest.

Every path is a path on the target host (``/etc/...``) joined under ``root``, so a staging root or a test's
throwaway directory gets the same layout. Install records each file it wrote (with its SHA-256) and each directory
it created in the manifest; uninstall removes exactly those: a recorded file changed since install is kept (and
reported) unless forced, a recorded directory is removed only when empty. A file that existed before install (an
operator's config) is never recorded, so never removed. Files are written by cni.install's atomic writer (temporary
name, fsync, rename), the one writer for installed files.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field

from cni.install import _write_atomic as write_atomic
from netplugin.errors import InvalidInput, NetpluginError

MANIFEST_PATH = "/var/lib/netplugin/install-manifest.json"


def under(root, path):
    """``path`` (absolute, on the target host) inside ``root``."""
    return os.path.join(root, path.lstrip("/"))


def target_of(root, path):
    """The target-host path of ``path``, a file under ``root``."""
    return "/" + os.path.relpath(path, root)


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclass
class Manifest:
    """What install added under ``root``: {target path: sha256} and the directories it created."""

    root: str
    files: dict = field(default_factory=dict)
    dirs: list = field(default_factory=list)

    @classmethod
    def load(cls, root):
        if not os.path.isdir(root):
            raise InvalidInput(f"the install root {root} is not a directory")
        path = under(root, MANIFEST_PATH)
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            return cls(root)
        except (OSError, ValueError) as e:
            raise NetpluginError(f"cannot read the install manifest {path}: {e}") from None
        return cls(root, dict(doc.get("files", {})), list(doc.get("dirs", [])))

    def save(self):
        self.makedirs(os.path.dirname(MANIFEST_PATH))
        doc = {"files": self.files, "dirs": self.dirs}
        write_atomic(
            under(self.root, MANIFEST_PATH), (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), 0o644
        )

    def makedirs(self, target_dir):
        """Create ``target_dir`` and missing parents under root, recording each one created."""
        missing = []
        d = target_dir
        while d not in ("/", "") and not os.path.isdir(under(self.root, d)):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(under(self.root, d), 0o755)
            except OSError as e:
                raise NetpluginError(f"failed to create {under(self.root, d)}: {e.strerror}") from None
            if d not in self.dirs:
                self.dirs.append(d)

    def write(self, target, data, mode):
        """Write a file of ours (its directories first) and record it."""
        self.makedirs(os.path.dirname(target))
        write_atomic(under(self.root, target), data, mode)
        self.record(target)

    def record(self, target):
        self.files[target] = sha256_of(under(self.root, target))

    def remove(self, force=False):
        """Remove the recorded files and (empty) directories; returns (removed, kept). The manifest goes last,
        unless a file was kept: then it records what is left, so a later ``--force`` finds it."""
        removed, kept, left = [], [], {}
        for target, digest in sorted(self.files.items()):
            path = under(self.root, target)
            if not os.path.lexists(path):
                continue
            if not force and (not os.path.isfile(path) or sha256_of(path) != digest):
                kept.append(f"{path} (changed since install; --force removes it)")
                left[target] = digest
                continue
            os.unlink(path)
            removed.append(path)
        self.files = left
        manifest = under(self.root, MANIFEST_PATH)
        if left:
            self.save()
        elif os.path.exists(manifest):
            os.unlink(manifest)
            removed.append(manifest)
        for target in sorted(self.dirs, key=lambda d: d.count("/"), reverse=True):
            path = under(self.root, target)
            try:
                os.rmdir(path)
                removed.append(path + "/")
            except FileNotFoundError:
                pass
            except OSError:
                if not left:
                    kept.append(f"{path}/ (not empty)")
        return removed, kept
