"""The etcd datastore against a real etcd: guarded transactions, leases, watches across restarts and compaction,
fail-over between endpoints, and user/password authentication."""

import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from netplugin.config import EtcdConfig
from netplugin.datastore import keys
from netplugin.datastore.client import Datastore, absent, delete_op, get_op, mod_is, prefix_unchanged_since, put_op
from netplugin.datastore.election import Election
from netplugin.datastore.watch import PrefixWatch
from netplugin.errors import DatastoreUnavailable
from netplugin.lab.etcd import EtcdServer, free_port
from netplugin.nodes import Liveness
from tests.waiting import poll

pytestmark = pytest.mark.functional

A = keys.ROOT + "test/a"
B = keys.ROOT + "test/b"
OTHER = keys.ROOT + "other/x"


@pytest.fixture
def server():
    """A private etcd for tests that restart, compact or lock it down."""
    srv = EtcdServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.close()


class Recorder:
    """Collects watch events and resync calls from the watch thread."""

    def __init__(self, ds=None, prefix=None):
        self.ds, self.prefix = ds, prefix
        self.events = []
        self.resyncs = []
        self.lock = threading.Lock()

    def on_events(self, events):
        with self.lock:
            self.events.extend((e.kind, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events)

    def on_resync(self):
        kvs, rev = self.ds.get_prefix(self.prefix)
        with self.lock:
            self.resyncs.append({kv.key: kv.value for kv in kvs})
        return rev

    def revisions(self):
        with self.lock:
            return [e[3] for e in self.events]


def watch(ds, prefix, start_revision, rec, **kw):
    return PrefixWatch(ds, prefix, start_revision, rec.on_events, rec.on_resync, name="test-watch", **kw).start()


# --- reads and writes ------------------------------------------------------------------------------------------


def test_put_get_list_delete_and_dump(etcd):
    rev = etcd.put(A, {"n": 1})
    kv = etcd.get(A)
    assert kv.value == {"n": 1} and kv.mod_revision == rev == kv.create_revision
    etcd.put(B, {"n": 2})
    etcd.put(OTHER, "x")
    kvs, read_rev = etcd.get_prefix(keys.ROOT + "test/")
    assert [kv.key for kv in kvs] == [A, B] and read_rev >= rev
    assert etcd.dump() == {A: {"n": 1}, B: {"n": 2}, OTHER: "x"}
    assert etcd.get(keys.ROOT + "missing") is None
    assert etcd.delete(A) == 1 and etcd.delete(A) == 0
    assert etcd.delete_prefix(keys.ROOT) == 2 and etcd.dump() == {}


def test_create_only_when_absent(etcd):
    assert etcd.create(A, 1) is True
    assert etcd.create(A, 2) is False
    assert etcd.get(A).value == 1


# --- transaction guards ----------------------------------------------------------------------------------------


def test_mod_is_guards_a_compare_and_swap(etcd):
    rev = etcd.put(A, "v1")
    assert etcd.txn([mod_is(A, rev)], [put_op(A, "v2")]).succeeded
    # The same stale revision now loses, and the failure branch reads the current record in the same round trip.
    res = etcd.txn([mod_is(A, rev)], [put_op(A, "v3")], [get_op(A)])
    assert not res.succeeded
    current = res.kvs(0)
    assert current[0].value == "v2" and current[0].mod_revision > rev
    assert etcd.get(A).value == "v2"


def test_mod_is_zero_means_absent(etcd):
    assert etcd.txn([mod_is(A, 0)], [put_op(A, 1)]).succeeded
    assert not etcd.txn([mod_is(A, 0)], [put_op(A, 2)]).succeeded
    assert etcd.get(A).value == 1


def test_absent(etcd):
    assert etcd.txn([absent(A)], [put_op(A, "a")]).succeeded
    assert not etcd.txn([absent(A)], [put_op(B, "x")]).succeeded
    assert etcd.txn([absent(B)], [delete_op(A), put_op(B, "b")]).succeeded
    assert etcd.dump() == {B: "b"}


def test_multi_key_txn_is_all_or_nothing(etcd):
    ra = etcd.put(A, 1)
    etcd.put(B, 1)
    before = etcd.dump()
    # B's guard is stale: neither write happens.
    res = etcd.txn([mod_is(A, ra), mod_is(B, ra)], [put_op(A, 2), put_op(B, 2), put_op(OTHER, 2)])
    assert not res.succeeded
    assert etcd.dump() == before


def test_prefix_unchanged_since(etcd):
    prefix = keys.ROOT + "test/"
    assert etcd.txn([prefix_unchanged_since(prefix, etcd.revision())], []).succeeded  # empty prefix
    etcd.put(A, 1)
    _, rev = etcd.get_prefix(prefix)
    assert etcd.txn([prefix_unchanged_since(prefix, rev)], []).succeeded
    etcd.put(OTHER, 1)  # outside the prefix: does not count
    assert etcd.txn([prefix_unchanged_since(prefix, rev)], []).succeeded
    etcd.put(B, 1)  # a new key under the prefix
    assert not etcd.txn([prefix_unchanged_since(prefix, rev)], []).succeeded
    _, rev = etcd.get_prefix(prefix)
    etcd.put(A, 2)  # a modified key under the prefix
    assert not etcd.txn([prefix_unchanged_since(prefix, rev)], [put_op(OTHER, 2)]).succeeded
    assert etcd.get(OTHER).value == 1


# --- leases ----------------------------------------------------------------------------------------------------


def test_lease_keeps_key_until_revoked(etcd):
    lease = etcd.grant_lease(10)
    etcd.put(A, "alive", lease=lease)
    assert etcd.get(A).lease == lease
    assert 0 < etcd.refresh_lease(lease) <= 10
    etcd.revoke_lease(lease)
    assert etcd.get(A) is None
    assert etcd.refresh_lease(lease) <= 0
    etcd.revoke_lease(lease)  # revoking twice is harmless


def test_lease_expires_without_keepalive(etcd):
    lease = etcd.grant_lease(2)
    etcd.put(A, "alive", lease=lease)
    assert poll(lambda: etcd.get(A) is None, timeout=8)


def test_election_one_leader_until_its_liveness_lease_ends_or_lapses(etcd):
    live_a, live_b = Liveness(etcd, "a", ttl=2), Liveness(etcd, "b", ttl=2)
    a, b = Election(etcd, "reclaimer", "a", live_a), Election(etcd, "reclaimer", "b", live_b)
    assert live_a.beat() and live_b.beat()
    assert a.campaign() and not b.campaign()
    assert a.campaign() and not b.campaign()  # leading is sticky while the lease is kept alive
    assert a.still_leading() and not b.still_leading()
    assert etcd.get(keys.leader("reclaimer")).value == {"holder": "a"}
    etcd.revoke_lease(live_a.lease)  # a's lease ends (revoked, as by an operator or etcd's lease expiry)
    assert b.campaign() and not a.campaign()
    assert live_a.beat() and not a.still_leading()  # a fresh liveness lease does not bring the leadership back
    # b "dies": it beats no more; its lease lapses after the TTL, and with it its leadership
    assert poll(lambda: live_a.beat() and a.campaign(), timeout=8)
    assert not b.still_leading()
    etcd.revoke_lease(live_a.lease)


# --- watches ---------------------------------------------------------------------------------------------------


def test_watch_delivers_puts_and_deletes_under_its_prefix(etcd):
    prefix = keys.ROOT + "test/"
    rec = Recorder(etcd, prefix)
    w = watch(etcd, prefix, etcd.revision(), rec)
    try:
        etcd.put(A, 1)
        etcd.put(OTHER, 1)  # not ours
        etcd.put(B, 2)
        etcd.delete(A)
        assert poll(lambda: len(rec.events) >= 3)
        time.sleep(0.2)
        assert [(k, key, v) for k, key, v, _ in rec.events] == [("put", A, 1), ("put", B, 2), ("delete", A, None)]
        assert rec.resyncs == []
    finally:
        w.stop()
    assert not w._thread.is_alive()


def test_watch_from_a_past_revision_replays_history(etcd):
    prefix = keys.ROOT + "test/"
    start = etcd.revision()
    r1 = etcd.put(A, 1)
    r2 = etcd.put(B, 2)
    rec = Recorder(etcd, prefix)
    w = watch(etcd, prefix, start, rec)
    try:
        assert poll(lambda: rec.revisions() == [r1, r2])
    finally:
        w.stop()


def test_watch_resumes_after_etcd_restart_without_losing_events(server):
    ds = Datastore(EtcdConfig(endpoints=[server.endpoint], timeout=2))
    watch_ds = Datastore(EtcdConfig(endpoints=[server.endpoint], timeout=2))
    # Hold the watch's reconnection until the writes below are done, so they certainly happen while it is away.
    gate, opened = threading.Event(), []
    real_open = watch_ds.open_watch_stream

    def gated_open(prefix, revision, read_timeout):
        opened.append(revision)
        if len(opened) > 1:
            gate.wait(10)
        return real_open(prefix, revision, read_timeout)

    watch_ds.open_watch_stream = gated_open
    prefix = keys.ROOT + "test/"
    rec = Recorder(ds, prefix)
    w = watch(watch_ds, prefix, ds.revision(), rec)
    try:
        before = [ds.put(f"{prefix}before-{i}", i) for i in range(3)]
        assert poll(lambda: rec.revisions() == before)
        server.restart()  # same port, same data
        assert poll(lambda: len(opened) >= 2)  # the stream broke and the watch is reconnecting
        after = [ds.put(f"{prefix}after-{i}", i) for i in range(3)]
        gate.set()
        assert poll(lambda: len(rec.revisions()) >= 6, timeout=15)
        time.sleep(0.3)
        assert rec.revisions() == before + after  # nothing lost, nothing twice, in order
        assert opened[1] == before[-1] + 1
        assert rec.resyncs == []
    finally:
        gate.set()
        w.stop()


def test_watch_resyncs_after_compaction(server):
    ds = Datastore(EtcdConfig(endpoints=[server.endpoint]))
    prefix = keys.ROOT + "test/"
    rec = Recorder(ds, prefix)
    w = watch(ds, prefix, ds.revision(), rec)
    ds.put(A, 1)
    assert poll(lambda: len(rec.events) == 1)
    w.stop()
    seen = w.next_revision - 1
    # While nobody watches, history moves on and is compacted away.
    ds.put(A, 2)
    ds.put(B, 3)
    ds.delete(A)
    last = ds.put(OTHER, 0)
    ds.call("/kv/compaction", {"revision": last, "physical": True})

    rec2 = Recorder(ds, prefix)
    w2 = watch(ds, prefix, seen, rec2)  # resuming where the stopped watch was
    try:
        assert poll(lambda: len(rec2.resyncs) == 1)
        assert rec2.resyncs[0] == {B: 3}  # the owner re-listed the current state
        assert rec2.events == []  # compacted events are not replayed
        # ... and the watch carries on from the resync's revision.
        r = ds.put(A, 4)
        assert poll(lambda: rec2.revisions() == [r])
        assert len(rec2.resyncs) == 1
    finally:
        w2.stop()


def test_a_silent_watch_stream_is_replaced_within_its_idle_timeout_and_loses_nothing(etcd):
    """etcd's default progress-notification period is 10 min: a quiet stream says nothing, exactly like a
    half-open one. The read deadline replaces it every idle_timeout, resuming where it was."""
    prefix = keys.ROOT + "test/"
    rec = Recorder(etcd, prefix)
    w = watch(etcd, prefix, etcd.revision(), rec, idle_timeout=1.0)
    try:
        first = etcd.put(A, 1)
        assert poll(lambda: rec.revisions() == [first])
        assert poll(lambda: w.idle_reconnects >= 2, timeout=4), "a silent stream was never replaced"
        later = [etcd.put(B, i) for i in range(3)]
        assert poll(lambda: rec.revisions() == [first] + later)
        time.sleep(0.3)
        assert rec.revisions() == [first] + later and rec.resyncs == []
    finally:
        w.stop()


def test_progress_notifications_keep_a_quiet_watch_connected():
    """With etcd sending progress notifications more often than the idle timeout, a quiet cluster is not
    mistaken for a dead connection."""
    srv = EtcdServer(progress_interval="300ms")
    try:
        srv.start()
        ds = Datastore(EtcdConfig(endpoints=[srv.endpoint]))
        rec = Recorder(ds, keys.ROOT)
        w = watch(ds, keys.ROOT, ds.revision(), rec, idle_timeout=1.0)
        try:
            time.sleep(3.5)
            assert (w.reconnects, w.idle_reconnects) == (0, 0)
            rev = ds.put(A, 1)
            assert poll(lambda: rec.revisions() == [rev])
        finally:
            w.stop()
    finally:
        srv.close()


def test_a_restored_older_snapshot_makes_the_watch_resync_instead_of_waiting(server, tmp_path):
    """After a restore etcd's revision is below the one the watch resumes from; a watch on that future revision
    would wait silently until the new history caught up. The watch notices and resyncs once."""
    ds = Datastore(EtcdConfig(endpoints=[server.endpoint], timeout=2))
    prefix = keys.ROOT + "test/"
    rec = Recorder(ds, prefix)
    w = watch(ds, prefix, ds.revision(), rec)
    try:
        ds.put(A, 1)
        snapshot = str(tmp_path / "snap.db")
        server.snapshot(snapshot)
        lost = [ds.put(B, i) for i in range(5)]  # history the restore throws away
        assert poll(lambda: rec.revisions()[-1:] == lost[-1:])
        server.restore(snapshot)
        assert ds.revision() < lost[-1]
        assert poll(lambda: len(rec.resyncs) == 1), "the watch did not notice the revision going backwards"
        assert rec.resyncs[0] == {A: 1} and w.backwards == 1
        rev = ds.put(B, "after restore")  # a revision the old history already used: delivered all the same
        assert rev <= lost[-1]
        assert poll(lambda: rec.events[-1][2:] == ("after restore", rev))
        assert len(rec.resyncs) == 1
    finally:
        w.stop()


def test_an_answer_older_than_seen_is_a_lagging_member_unless_the_cluster_agrees(etcd):
    """A header revision below what the watch saw: if a linearizable read is not older, the member lags (move
    on, no resync); if it is, the history went backwards (resync once)."""
    rec = Recorder(etcd, keys.ROOT + "test/")
    now = etcd.put(A, 1)
    w = PrefixWatch(etcd, keys.ROOT + "test/", now, rec.on_events, rec.on_resync)  # not started: driven by hand
    stale = {"header": {"revision": str(now - 1)}}
    w.next_revision = now + 1
    assert w._handle(stale) is True and rec.resyncs == [] and w.backwards == 0
    w.next_revision = now + 100  # what a watch saw before etcd was restored from an older snapshot
    assert w._handle(stale) is True and rec.resyncs == [{A: 1}] and w.backwards == 1
    assert w.next_revision == now + 1


# --- reachability and fail-over ----------------------------------------------------------------------------------


def test_unreachable_etcd_is_one_clear_error_naming_the_endpoint():
    endpoint = f"http://127.0.0.1:{free_port()}"
    ds = Datastore(EtcdConfig(endpoints=[endpoint], timeout=2))
    with pytest.raises(DatastoreUnavailable) as err:
        ds.get(A)
    assert endpoint in str(err.value) and "\n" not in str(err.value)


def test_fails_over_to_the_next_endpoint(etcd, etcd_server):
    dead = f"http://127.0.0.1:{free_port()}"
    ds = Datastore(EtcdConfig(endpoints=[dead, etcd_server.endpoint], timeout=2))
    ds.put(A, "via failover")
    assert etcd.get(A).value == "via failover"


@pytest.fixture
def broken_endpoint():
    """An HTTP endpoint that answers every request with a body cut short, as an overloaded proxy or a member dying
    mid-answer does."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n{")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        t.join(timeout=5)


def test_a_broken_answer_is_datastore_unavailable_and_fails_over(etcd, etcd_server, broken_endpoint):
    alone = Datastore(EtcdConfig(endpoints=[broken_endpoint], timeout=2))
    with pytest.raises(DatastoreUnavailable) as err:
        alone.get(A)
    assert broken_endpoint in str(err.value) and "broken answer" in str(err.value)
    ds = Datastore(EtcdConfig(endpoints=[broken_endpoint, etcd_server.endpoint], timeout=2))
    ds.put(A, "past the broken member")
    assert etcd.get(A).value == "past the broken member"


def test_endpoints_must_be_urls():
    from netplugin.errors import InvalidInput

    with pytest.raises(InvalidInput):
        EtcdConfig(endpoints="127.0.0.1:2379")


# --- authentication --------------------------------------------------------------------------------------------


def test_user_password_auth(server):
    admin = Datastore(EtcdConfig(endpoints=[server.endpoint]))
    admin.call("/auth/user/add", {"name": "root", "password": "rootpw"})
    admin.call("/auth/user/grant", {"user": "root", "role": "root"})
    admin.call("/auth/enable", {})

    anonymous = Datastore(EtcdConfig(endpoints=[server.endpoint]))
    with pytest.raises(DatastoreUnavailable, match="user name is empty"):
        anonymous.get(A)
    wrong = Datastore(EtcdConfig(endpoints=[server.endpoint], username="root", password="nope"))
    with pytest.raises(DatastoreUnavailable, match="authentication failed"):
        wrong.put(A, "x")

    ds = Datastore(EtcdConfig(endpoints=[server.endpoint], username="root", password="rootpw"))
    ds.put(A, "secret")
    assert ds.get(A).value == "secret"
    assert ds.txn([absent(B)], [put_op(B, "b")]).succeeded

    # Watches carry a token too, on a Datastore used for nothing else (so no call refreshes it for them).
    watch_ds = Datastore(EtcdConfig(endpoints=[server.endpoint], username="root", password="rootpw"))
    rec = Recorder(ds, keys.ROOT + "test/")
    w = watch(watch_ds, keys.ROOT + "test/", ds.revision(), rec)
    try:
        ds.put(A, "watched")
        assert poll(lambda: [e[2] for e in rec.events] == ["watched"])
        # A restarted etcd forgets its tokens: calls and the watch both authenticate again by themselves.
        server.restart()
        assert ds.get(A).value == "watched"
        ds.put(A, "after restart")
        assert poll(lambda: [e[2] for e in rec.events] == ["watched", "after restart"])
        assert w.reconnects <= 5  # no busy loop of refused watches
    finally:
        w.stop()
    assert ds.dump() == {A: "after restart", B: "b"}


# --- TLS -------------------------------------------------------------------------------------------------------


def _make_certs(d):
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (EC keys: fast)."""

    def sh(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sh("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=npt-test-ca")
    # etcd's gateway dials its own gRPC port with the server certificate, so that one is a client's too.
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext)
        sh("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        sh(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
        )

    def path(f):
        return os.path.join(d, f)

    return {
        "ca": path("ca.pem"),
        "server_cert": path("server.pem"),
        "server_key": path("server.key"),
        "cert": path("client.pem"),
        "key": path("client.key"),
    }


@pytest.fixture
def tls_etcd():
    """etcd serving https only and requiring client certificates; yields (endpoint, certificate paths)."""
    d = tempfile.mkdtemp(prefix="npt-etcd-tls-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    proc = log = None
    try:
        certs = _make_certs(d)
        endpoint, peer = f"https://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        log = open(os.path.join(d, "etcd.log"), "w")
        proc = subprocess.Popen(
            [
                "etcd",
                "--name",
                "t",
                "--data-dir",
                os.path.join(d, "data"),
                "--listen-client-urls",
                endpoint,
                "--advertise-client-urls",
                endpoint,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"t={peer}",
                "--cert-file",
                certs["server_cert"],
                "--key-file",
                certs["server_key"],
                "--trusted-ca-file",
                certs["ca"],
                "--client-cert-auth",
                "--log-level",
                "error",
                "--logger",
                "zap",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        probe = Datastore(
            EtcdConfig(endpoints=[endpoint], ca_cert=certs["ca"], cert=certs["cert"], key=certs["key"], timeout=1)
        )
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, open(os.path.join(d, "etcd.log")).read()
            try:
                probe.revision()
                break
            except DatastoreUnavailable as e:
                assert time.monotonic() < deadline, f"TLS etcd did not come up: {e}"
                time.sleep(0.1)
        yield endpoint, certs
    finally:
        if proc and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            log.close()
        shutil.rmtree(d, ignore_errors=True)


def test_tls_with_client_certificates(tls_etcd, monkeypatch):
    endpoint, certs = tls_etcd
    # A system CA bundle in the environment (common in containers) must not replace the configured etcd CA.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    ds = Datastore(EtcdConfig(endpoints=[endpoint], ca_cert=certs["ca"], cert=certs["cert"], key=certs["key"]))
    rec = Recorder(ds, keys.ROOT + "test/")
    w = watch(ds, keys.ROOT + "test/", ds.revision(), rec)  # watch streams use the same TLS session
    try:
        ds.put(A, "over tls")
        assert ds.get(A).value == "over tls"
        assert poll(lambda: [e[2] for e in rec.events] == ["over tls"])
    finally:
        w.stop()
    # Without trusting the server's CA, or without a client certificate: one clear error naming the endpoint.
    for cfg, reason in (
        (
            EtcdConfig(endpoints=[endpoint], cert=certs["cert"], key=certs["key"], timeout=2),
            "TLS certificate verification failed",
        ),
        (EtcdConfig(endpoints=[endpoint], ca_cert=certs["ca"], timeout=2), "TLS"),
    ):
        with pytest.raises(DatastoreUnavailable) as err:
            Datastore(cfg).get(A)
        assert endpoint in str(err.value) and reason in str(err.value) and "\n" not in str(err.value)
