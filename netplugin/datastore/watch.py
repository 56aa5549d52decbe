"""A watch on a key prefix that outlives etcd restarts, dead connections and restored snapshots.

etcd3gw's own watcher swallows errors and ignores compaction, so the loop lives here: read the stream, remember
the last revision seen, and on any break reconnect from ``last + 1``. If etcd has compacted past that revision
the watch is answered with ``compact_revision``: we then call ``on_resync`` (the owner re-lists everything and
returns the revision it read at) and continue from there. Handlers only mark state dirty (STYLE.md), so a resync
is always safe.

Liveness. A half-open connection (a peer or NAT that vanished without a FIN) would block the read forever, so the
stream has a read deadline, ``idle_timeout``: no byte for that long and the watch reconnects from where it was,
losing nothing. The watch asks for progress notifications, so a quiet cluster still sends a header every
``--experimental-watch-progress-notify-interval`` (etcd's default is 10 min; run etcd with 3 s or less and a
quiet cluster never reconnects). With etcd's default, a quiet agent reconnects once per ``idle_timeout``: one
cheap watch creation, no event lost.

Revision going backwards. etcd restored from an older snapshot has a lower revision than the one we resume from,
and a watch on a future revision would wait silently until the new history caught up. Any answer whose header
revision is below what we have already seen is checked with a linearizable read: if the cluster's revision is
lower too, the history we knew is gone and we resync (``on_resync``); otherwise the member we watch lags behind
its cluster and we move to another one.
"""

import json
import logging
import socket
import threading
import time

from netplugin.datastore.client import KV
from netplugin.errors import DatastoreUnavailable, NetpluginError

LOG = logging.getLogger(__name__)

# Seconds without a byte on the stream before it counts as dead: above 3 progress notifications at the 3 s
# interval the README recommends (one lost or late one is not a death), and short enough that a half-open
# connection is replaced well within the sync loop's full resync period.
IDLE_TIMEOUT = 10.0


class Event:
    __slots__ = ("kind", "kv")

    def __init__(self, kind, kv):
        self.kind = kind  # "put" or "delete"
        self.kv = kv

    def __repr__(self):
        return f"Event({self.kind} {self.kv.key})"


class _Idle(Exception):
    """The stream sent nothing for idle_timeout seconds."""


class PrefixWatch:
    """Runs ``on_events(list[Event])`` for every change under ``prefix`` after ``start_revision``."""

    def __init__(
        self, datastore, prefix, start_revision, on_events, on_resync, name="watch", idle_timeout=IDLE_TIMEOUT
    ):
        self.ds = datastore
        self.prefix = prefix
        self.next_revision = start_revision + 1
        self.on_events = on_events
        self.on_resync = on_resync
        self.idle_timeout = idle_timeout
        self._stop = threading.Event()
        self._response = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.reconnects = 0
        self.idle_reconnects = 0  # reconnects after a silent stream (a test hook and a metric)
        self.backwards = 0  # times etcd's revision was found to have gone backwards
        self._warned_idle = False
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
            except _Idle as e:
                self._log_idle(e)
                self.idle_reconnects += 1
                backoff = 0.1
            except NetpluginError as e:
                LOG.warning("watch %s: %s; retrying in %.1fs", self.prefix, e, backoff)
            except Exception as e:  # a broken HTTP stream surfaces as many exception types
                if self._stop.is_set():
                    return
                LOG.warning(
                    "watch %s broke (%s: %s); resuming from revision %d",
                    self.prefix,
                    type(e).__name__,
                    e,
                    self.next_revision,
                )
                self.ds.rotate()
            self.reconnects += 1
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _log_idle(self, e):
        if self._warned_idle:
            LOG.debug("watch %s: %s; reconnecting from revision %d", self.prefix, e, self.next_revision)
            return
        self._warned_idle = True
        LOG.info(
            "watch %s: %s; reconnecting from revision %d (a quiet etcd without "
            "--experimental-watch-progress-notify-interval of a few seconds does this every %.0f s; "
            "said once)",
            self.prefix,
            e,
            self.next_revision,
            self.idle_timeout,
        )

    def _stream_once(self):
        if self._reauth:
            self.ds.authenticate(fresh=True)
            self._reauth = False
        self._response = self.ds.open_watch_stream(self.prefix, self.next_revision, self.idle_timeout)
        answered = False
        try:
            for line in self._lines(self._response):
                if self._stop.is_set():
                    return
                if not line.strip():
                    continue
                answered = True
                message = json.loads(line)
                if "error" in message:  # the gateway's last line before it ends the stream, e.g. "no leader"
                    raise DatastoreUnavailable(f"etcd ended the watch: {message['error'].get('message', message)}")
                result = message.get("result", {})
                if self._handle(result):
                    return  # the watch must be re-created (compaction, cancel, revision backwards)
        except _Idle:
            if not answered:
                self.ds.rotate()  # the member took the connection but never answered: try another one
            raise
        finally:
            self._response.close()
            self._response = None

    def _lines(self, response):
        """The stream's lines; a read that times out (requests' read deadline) becomes ``_Idle``."""
        started = time.monotonic()
        lines = response.iter_lines(chunk_size=None)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except Exception as e:  # requests wraps urllib3's ReadTimeoutError in a ConnectionError
                if "timed out" in str(e) and not self._stop.is_set():
                    raise _Idle(
                        f"no data for {self.idle_timeout:g} s (stream open for {time.monotonic() - started:.0f} s)"
                    ) from None
                raise
            yield line

    def _handle(self, result):
        compact = int(result.get("compact_revision", 0) or 0)
        if compact:
            LOG.info("watch %s: revision %d compacted (now %d); resyncing", self.prefix, self.next_revision, compact)
            self.next_revision = self.on_resync() + 1
            return True
        if result.get("canceled"):
            reason = result.get("cancel_reason", "")
            LOG.info("watch %s canceled by etcd: %s", self.prefix, reason)
            self._reauth = "auth" in reason.lower()
            return True
        header_rev = int(result.get("header", {}).get("revision", 0) or 0)
        if header_rev and header_rev < self.next_revision - 1:
            return self._behind(header_rev)
        events = []
        for ev in result.get("events", []):
            kv = KV.from_api(ev["kv"])
            events.append(Event("delete" if ev.get("type") == "DELETE" else "put", kv))
            self.next_revision = max(self.next_revision, kv.mod_revision + 1)
        if not events and header_rev and not result.get("created"):
            # progress notification: nothing under our prefix changed up to header_rev
            self.next_revision = max(self.next_revision, header_rev + 1)
        if events:
            self.on_events(events)
        return False

    def _behind(self, header_rev):
        """The stream answered at a revision older than one we saw: a restored etcd, or a lagging member."""
        seen = self.next_revision - 1
        current = self.ds.revision()  # linearizable: the cluster's revision, not this member's
        if current >= seen:
            LOG.info(
                "watch %s: member at revision %d lags behind the cluster (%d); trying another member",
                self.prefix,
                header_rev,
                current,
            )
            self.ds.rotate()
            return True
        self.backwards += 1
        LOG.warning(
            "event=watch.revision_backwards prefix=%s revision=%d seen=%d: etcd's revision went backwards "
            "(restored from an older snapshot?); the history after it is gone, resyncing everything",
            self.prefix,
            current,
            seen,
        )
        self.next_revision = self.on_resync() + 1
        return True
