"""The etcd v3 datastore: typed reads, guarded transactions, leases, built on etcd3gw.

etcd3gw gives us the HTTP session, TLS, API-path discovery and error classes; we speak the v3 JSON API through
its ``post`` so every answer keeps the revisions (the header revision after a list is where a watch resumes).
Values are JSON documents. Every error reaching etcd becomes ``DatastoreUnavailable`` naming the endpoints, a
broken or truncated answer too: callers retry those, none of them ends a process.
"""

import base64
import json
import logging
import threading
import urllib.parse
from dataclasses import dataclass

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_exc

from netplugin.datastore.keys import ROOT
from netplugin.errors import DatastoreUnavailable, NetpluginError

LOG = logging.getLogger(__name__)
MAX_TXN_OPS = 100  # operations we put in one transaction; etcd's default --max-txn-ops is 128


def _b64(data):
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def _unb64(data):
    return base64.b64decode(data).decode() if data else ""


def _prefix_end(prefix):
    """The range end covering every key that starts with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


def _reason(err):
    """A few words on why a connection failed (etcd3gw keeps requests' long message in ``detail_text``)."""
    text = str(getattr(err, "detail_text", "") or err)
    for marker, reason in (
        ("CERTIFICATE_VERIFY_FAILED", "TLS certificate verification failed"),
        ("SSL", "TLS handshake failed"),
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
    ):
        if marker in text:
            return reason
    return type(err).__name__


@dataclass(frozen=True)
class KV:
    key: str
    value: object  # the decoded JSON document
    mod_revision: int
    create_revision: int
    lease: int = 0

    @classmethod
    def from_api(cls, kv):
        raw = _unb64(kv.get("value", ""))
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            value = raw
        return cls(
            key=_unb64(kv["key"]),
            value=value,
            mod_revision=int(kv.get("mod_revision", 0)),
            create_revision=int(kv.get("create_revision", 0)),
            lease=int(kv.get("lease", 0)),
        )


# --- transaction building blocks -------------------------------------------------------------------------------


def mod_is(key, revision):
    """Guard: the key is unchanged since we read it at ``revision`` (0 means: the key must not exist)."""
    if not revision:
        return absent(key)
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": revision}


def absent(key):
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}


def prefix_unchanged_since(prefix, revision):
    """Guard: no key under ``prefix`` was created or modified after ``revision``."""
    return {
        "key": _b64(prefix),
        "range_end": _prefix_end(prefix),
        "target": "MOD",
        "result": "LESS",
        "mod_revision": revision + 1,
    }


def put_op(key, value, lease=None):
    req = {"key": _b64(key), "value": _b64(json.dumps(value, sort_keys=True, separators=(",", ":")))}
    if lease:
        req["lease"] = lease
    return {"request_put": req}


def delete_op(key):
    return {"request_delete_range": {"key": _b64(key)}}


def get_op(key):
    return {"request_range": {"key": _b64(key)}}


@dataclass
class TxnResult:
    succeeded: bool
    revision: int
    responses: list

    def kvs(self, index):
        """The KVs a range op at ``index`` of the taken branch returned (used to refresh after a lost CAS)."""
        resp = self.responses[index].get("response_range", {})
        return [KV.from_api(kv) for kv in resp.get("kvs", [])]


class Datastore:
    """One etcd client per process part. Thread-safe: requests' session is shared, calls are independent."""

    def __init__(self, config):
        self.config = config
        self._lock = threading.Lock()
        self._index = 0
        self._clients = [self._make_client(url) for url in config.endpoints]

    # --- connection ---------------------------------------------------------------------------------------------

    def _make_client(self, url):
        u = urllib.parse.urlparse(url)
        client = etcd3gw.Etcd3Client(
            host=u.hostname,
            port=u.port or 2379,
            protocol=u.scheme,
            ca_cert=self.config.ca_cert,
            cert_cert=self.config.cert,
            cert_key=self.config.key,
            timeout=self.config.timeout,
        )
        # Nothing from the environment: requests would let REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override our CA,
        # route etcd through an HTTP(S)_PROXY meant for the outside world, and read ~/.netrc; and looking at the
        # environment again on every request cost 0.65 ms of each etcd call (a quarter of a put, measured).
        client.session.trust_env = False
        return client

    def _authenticate(self, client):
        body = {"name": self.config.username, "password": self.config.password or ""}
        client.session.headers.pop("Authorization", None)  # etcd refuses to authenticate with a stale token
        resp = client.post(client.get_url("/auth/authenticate"), json=body)
        client.session.headers["Authorization"] = resp["token"]

    def authenticate(self, fresh=False):
        """Hold a token for the current endpoint (``fresh``: ours was refused). Calls do this by themselves; watch
        streams cannot, as etcd answers a stale token by cancelling the watch."""
        if not self.config.username:
            return
        with self._lock:
            idx = self._index
        client = self._clients[idx]
        if fresh or "Authorization" not in client.session.headers:
            try:
                self._authenticate(client)
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as e:
                raise DatastoreUnavailable(f"etcd unreachable at {self.config.endpoints[idx]} ({_reason(e)})") from None
            except etcd_exc.Etcd3Exception as e:
                detail = getattr(e, "detail_text", "") or str(e) or type(e).__name__
                raise DatastoreUnavailable(
                    f"etcd at {self.config.endpoints[idx]} refused authentication: {str(detail).strip()[:200]}"
                ) from None

    def describe(self):
        return ",".join(self.config.endpoints)

    def call(self, path, body):
        """POST one v3 API call, failing over between endpoints; raise DatastoreUnavailable when none answers."""
        errors = []
        with self._lock:
            start = self._index
        n = len(self._clients)
        for i in range(n):
            idx = (start + i) % n
            client = self._clients[idx]
            try:
                if self.config.username and "Authorization" not in client.session.headers:
                    self._authenticate(client)
                try:
                    resp = client.post(client.get_url(path), json=body)
                except etcd_exc.Etcd3Exception as e:
                    # etcd3gw puts the HTTP reason in str(e) and etcd's message ("invalid auth token") in
                    # detail_text; a restarted etcd forgets simple tokens, so look at both.
                    if self.config.username and "token" in f"{e} {getattr(e, 'detail_text', '')}":
                        self._authenticate(client)  # the token expired: once more with a fresh one
                        resp = client.post(client.get_url(path), json=body)
                    else:
                        raise
                with self._lock:
                    self._index = idx
                return resp
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as e:
                errors.append(f"{self.config.endpoints[idx]}: {_reason(e)}")
            except (requests.exceptions.RequestException, ValueError) as e:
                # The answer broke off or was not JSON (etcd, or a proxy before it, overloaded or restarting):
                # as transient as a timeout, and the caller retries it the same way.
                errors.append(f"{self.config.endpoints[idx]}: broken answer ({type(e).__name__})")
            except etcd_exc.Etcd3Exception as e:
                detail = getattr(e, "detail_text", "") or str(e) or type(e).__name__  # never an empty reason
                raise DatastoreUnavailable(
                    f"etcd at {self.config.endpoints[idx]} refused {path}: {str(detail).strip()[:200]}"
                ) from None
        raise DatastoreUnavailable(f"etcd unreachable at {self.describe()} ({'; '.join(errors)})")

    # --- reads ----------------------------------------------------------------------------------------------------

    def get(self, key):
        resp = self.call("/kv/range", {"key": _b64(key)})
        kvs = resp.get("kvs", [])
        return KV.from_api(kvs[0]) if kvs else None

    def get_prefix(self, prefix, keys_only=False):
        """All KVs under ``prefix`` sorted by key, plus the store revision they were read at."""
        body = {"key": _b64(prefix), "range_end": _prefix_end(prefix), "sort_order": "ASCEND", "sort_target": "KEY"}
        if keys_only:
            body["keys_only"] = True
        resp = self.call("/kv/range", body)
        kvs = [KV.from_api(kv) for kv in resp.get("kvs", [])]
        return kvs, int(resp["header"]["revision"])

    def get_prefixes(self, prefixes):
        """Several prefixes read in one transaction, so all of them reflect one revision."""
        ops = [{"request_range": {"key": _b64(p), "range_end": _prefix_end(p)}} for p in prefixes]
        res = self.txn([], ops)
        return [res.kvs(i) for i in range(len(prefixes))], res.revision

    def list(self, prefix):
        return self.get_prefix(prefix)[0]

    def revision(self):
        resp = self.call("/kv/range", {"key": _b64(ROOT), "limit": 1})
        return int(resp["header"]["revision"])

    # --- writes ---------------------------------------------------------------------------------------------------

    def put(self, key, value, lease=None):
        resp = self.call("/kv/put", put_op(key, value, lease)["request_put"])
        return int(resp["header"]["revision"])

    def delete(self, key):
        resp = self.call("/kv/deleterange", {"key": _b64(key)})
        return int(resp.get("deleted", 0))

    def delete_prefix(self, prefix):
        resp = self.call("/kv/deleterange", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return int(resp.get("deleted", 0))

    def txn(self, compare, success, failure=()):
        resp = self.call("/kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)})
        return TxnResult(bool(resp.get("succeeded", False)), int(resp["header"]["revision"]), resp.get("responses", []))

    def create(self, key, value, lease=None):
        """Put only if absent; returns True when created."""
        return self.txn([absent(key)], [put_op(key, value, lease)]).succeeded

    # --- leases ---------------------------------------------------------------------------------------------------

    def grant_lease(self, ttl):
        resp = self.call("/lease/grant", {"TTL": int(ttl)})
        return int(resp["ID"])

    def refresh_lease(self, lease_id):
        """Keep a lease alive; returns its remaining TTL (0 or less: the lease is gone)."""
        resp = self.call("/lease/keepalive", {"ID": lease_id})
        result = resp.get("result", resp)
        return int(result.get("TTL", 0))

    def revoke_lease(self, lease_id):
        try:
            self.call("/lease/revoke", {"ID": lease_id})
        except NetpluginError:
            pass

    # --- watch ----------------------------------------------------------------------------------------------------

    def open_watch_stream(self, prefix, start_revision, read_timeout):
        """An HTTP stream of watch responses from the current endpoint (see datastore.watch for the loop). A read
        that gets no byte for ``read_timeout`` seconds raises (requests' read deadline): the stream is dead."""
        self.authenticate()
        with self._lock:
            client = self._clients[self._index]
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _prefix_end(prefix),
                "start_revision": start_revision,
                "progress_notify": True,
            }
        }
        # Its own connection, never one from the calls' pool: a pooled connection may be dead already (half-open),
        # and a reused one would cost a whole read deadline to find out.
        session = requests.Session()
        for attr in ("verify", "cert", "trust_env"):
            setattr(session, attr, getattr(client.session, attr))
        # hasleader (gRPC metadata through the gateway): a member that loses its leader (cut off from its quorum)
        # ends the watch with "no leader" instead of serving a history that stopped moving.
        session.headers = dict(client.session.headers, Connection="close", **{"Grpc-Metadata-hasleader": "true"})
        try:
            return session.post(
                client.get_url("/watch"), json=body, stream=True, timeout=(self.config.timeout, read_timeout)
            )
        except Exception as e:  # requests' connection errors: the loop retries with backoff, on the next member
            self.rotate()
            raise DatastoreUnavailable(f"etcd unreachable at {self.describe()}: cannot watch ({type(e).__name__})")

    def rotate(self):
        """Move to the next endpoint (after a watch stream broke)."""
        with self._lock:
            self._index = (self._index + 1) % len(self._clients)

    # --- debugging / tests ----------------------------------------------------------------------------------------

    def dump(self, prefix=None):
        """Every key under ``prefix`` with its value, as a dict (tests compare before/after)."""
        kvs, _ = self.get_prefix(prefix or ROOT)
        return {kv.key: kv.value for kv in kvs}
