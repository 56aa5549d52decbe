"""A small readers-writer lock: ADD/DEL share it, a full dataplane reconcile takes it alone.

A reconcile reads etcd and then the kernel; an ADD that wrote its veth between those two reads would look like
a stray to the reconcile and be deleted. Holding the lock shared keeps ADDs concurrent with each other while
the (rare, milliseconds long) reconcile sees a quiet host.
"""

import threading


class RWLock:
    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    def busy(self):
        """Held by anyone (a snapshot: it may change right after)."""
        with self._cond:
            return bool(self._readers or self._writer)

    class _Ctx:
        def __init__(self, enter, leave):
            self.enter, self.leave = enter, leave

        def __enter__(self):
            self.enter()

        def __exit__(self, *exc):
            self.leave()

    def shared(self):
        return self._Ctx(self.acquire_read, self.release_read)

    def exclusive(self):
        return self._Ctx(self.acquire_write, self.release_write)
