"""Host veths being deleted after DEL answered: one worker thread, and the names still pending.

DEL detaches an endpoint first (its host routes and container addresses gone, netplugin.dataplane.endpoint's
``detach``), releases the addresses, and answers; the kernel's veth deletion, most of DEL's time, finishes here.
Nothing can reach the old veth through an address any more, so a released address handed to a new container
at once lands on the new container's veth, never the old one. What must not overlap a pending deletion is
anything about the same interface name: an ADD of the same endpoint id (a runtime retrying) would find the dying
veth and converge it, and a reconcile would count it. So those ``wait`` for the name (or for all) first.

One worker, not one thread per DEL: deletions take the kernel's rtnl lock in turn anyway.
"""

import logging
import queue
import threading
import time

LOG = logging.getLogger(__name__)


class LinkReaper:
    def __init__(self):
        self._pending = {}  # interface name -> deletions queued for it
        self._cond = threading.Condition()
        self._queue = queue.Queue()
        self._worker = None

    def submit(self, name, delete):
        """Run ``delete()`` (which deletes the interface ``name``) on the worker; returns at once."""
        with self._cond:
            self._pending[name] = self._pending.get(name, 0) + 1
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="netplugin-link-reaper", daemon=True)
                self._worker.start()
        self._queue.put((name, delete))

    def pending(self):
        with self._cond:
            return sorted(self._pending)

    def wait(self, name=None, timeout=10.0):
        """Until no deletion of ``name`` (None: of anything) is pending, at most ``timeout`` s; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending if name is None else name in self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    LOG.warning("event=dataplane.reap_wait_timeout name=%s pending=%s", name, sorted(self._pending))
                    return False
                self._cond.wait(left)
        return True

    def _run(self):
        while True:
            name, delete = self._queue.get()
            try:
                delete()
            except Exception as e:  # noqa: BLE001 - the next reconcile deletes a veth no record names
                LOG.warning("event=dataplane.reap_failed name=%s error=%s", name, getattr(e, "msg", e))
            finally:
                with self._cond:
                    left = self._pending.pop(name) - 1
                    if left:
                        self._pending[name] = left
                    self._cond.notify_all()
