"""A watch on a key prefix that outlives etcd restarts.

etcd3gw's own watcher swallows errors and ignores compaction, so the loop lives here: read the stream, remember
the last revision seen, and on any break reconnect from ``last + 1``. If etcd has compacted past that revision
the watch is answered with ``compact_revision``: we then call ``on_resync`` (the owner re-lists everything and
returns the revision it read at) and continue from there. Handlers only mark state dirty (STYLE.md), so a resync
is always safe.
"""
import json
import logging
import socket
import threading

from netplugin.datastore.client import KV
from netplugin.errors import NetpluginError

LOG = logging.getLogger(__name__)


class Event:
    __slots__ = ("kind", "kv")

    def __init__(self, kind, kv):
        self.kind = kind  # "put" or "delete"
        self.kv = kv

    def __repr__(self):
        return f"Event({self.kind} {self.kv.key})"


class PrefixWatch:
    """Runs ``on_events(list[Event])`` for every change under ``prefix`` after ``start_revision``."""

    def __init__(self, datastore, prefix, start_revision, on_events, on_resync, name="watch"):
        self.ds = datastore
        self.prefix = prefix
        self.next_revision = start_revision + 1
        self.on_events = on_events
        self.on_resync = on_resync
        self._stop = threading.Event()
        self._response = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.reconnects = 0
        self._reauth = False  # etcd cancelled the watch for a stale token (it forgets tokens when restarted)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        resp = self._response
        if resp is not None:
            # close() would wait for the reader's lock; shutting the socket down wakes the blocked read instead.
            try:
                sock = socket.fromfd(resp.raw._fp.fileno(), socket.AF_INET, socket.SOCK_STREAM)
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except (OSError, AttributeError, ValueError):
                pass
        self._thread.join(timeout=5)

    def _run(self):
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._stream_once()
                backoff = 0.1
            except NetpluginError as e:
                LOG.warning("watch %s: %s; retrying in %.1fs", self.prefix, e, backoff)
            except Exception as e:  # a broken HTTP stream surfaces as many exception types
                if self._stop.is_set():
                    return
                LOG.warning("watch %s broke (%s: %s); resuming from revision %d", self.prefix,
                            type(e).__name__, e, self.next_revision)
                self.ds.rotate()
            self.reconnects += 1
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _stream_once(self):
        if self._reauth:
            self.ds.authenticate(fresh=True)
            self._reauth = False
        self._response = self.ds.open_watch_stream(self.prefix, self.next_revision)
        try:
            for line in self._response.iter_lines(chunk_size=None):
                if self._stop.is_set():
                    return
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if self._handle(result):
                    return  # the watch must be re-created (compaction or cancel)
        finally:
            self._response.close()
            self._response = None

    def _handle(self, result):
        compact = int(result.get("compact_revision", 0) or 0)
        if compact:
            LOG.info("watch %s: revision %d compacted (now %d); resyncing", self.prefix, self.next_revision,
                     compact)
            self.next_revision = self.on_resync() + 1
            return True
        if result.get("canceled"):
            reason = result.get("cancel_reason", "")
            LOG.info("watch %s canceled by etcd: %s", self.prefix, reason)
            self._reauth = "auth" in reason.lower()
            return True
        events = []
        for ev in result.get("events", []):
            kv = KV.from_api(ev["kv"])
            events.append(Event("delete" if ev.get("type") == "DELETE" else "put", kv))
            self.next_revision = max(self.next_revision, kv.mod_revision + 1)
        header_rev = int(result.get("header", {}).get("revision", 0) or 0)
        if not events and header_rev and not result.get("created"):
            # progress notification: nothing under our prefix changed up to header_rev
            self.next_revision = max(self.next_revision, header_rev + 1)
        if events:
            self.on_events(events)
        return False
