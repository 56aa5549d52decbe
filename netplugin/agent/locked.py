"""The endpoint service as the agent's front doors (CNI API, Docker plugin) see it: under the host lock, and
with ADD waiting for policy to cover the new endpoint."""

import logging
import time

from netplugin.agent.metrics import Metrics
from netplugin.errors import NetpluginError, NotReady

LOG = logging.getLogger(__name__)


class LockedService:
    """The EndpointService as the front doors see it inside the agent.

    ADD/DEL hold the shared side of the host lock (see rwlock.py). After ADD, the new interface is only useful
    once this host's policy knows it (our chains drop traffic of unknown ``np*`` interfaces), so ADD waits, up to
    ``policy_wait`` seconds, for a sync pass whose view holds the endpoint's record (``revision(endpoint_id)``: the
    store revision that wrote it). Concurrent ADDs share one pass. 0 turns the wait off (Calico's default, where a
    new pod can lose its first packets).

    Fast path: ``install(ep, revision)`` (the policy reconciler's, see agent/policy.py) puts the new endpoint's
    policy in place on the ADD thread from the last synced view, and ADD returns without the watch round trip.
    It waits as before when install cannot (no sync pass has run yet: False; an apply failed: raises) or when
    the sync is failing or stalled (then it answers NotReady as before).
    """

    def __init__(
        self,
        service,
        lock,
        wait_for_sync=None,
        policy_wait=0.0,
        revision=None,
        trouble=None,
        metrics=None,
        install=None,
        forget=None,
    ):
        self._service = service
        self._metrics = metrics or Metrics()  # ADD/DEL phases and errors (netplugin/agent/metrics.py)
        self._lock = lock
        self._wait_for_sync = wait_for_sync
        self._policy_wait = policy_wait
        self._revision = revision
        self._trouble = trouble  # () -> None, or why the sync is failing or stalled
        self._install = install  # (Endpoint, revision) -> True when policy covers it now
        self._forget = forget  # endpoint id -> None: DEL, so install's record is not compiled in any more

    @property
    def host(self):
        return self._service.host

    def get(self, ep_id):
        return self._service.get(ep_id)

    def list(self, host=None):
        return self._service.list(host)

    def check(self, ep_id, netns=None, expected=None):
        return self._service.check(ep_id, netns, expected)

    def spec_of(self, ep):
        return self._service.spec_of(ep)

    def policy_ready(self, what):
        """Wait (bounded) until policy covers an endpoint just recorded. A slow sync never fails the request;
        a failing or stalled one (the agent's ``sync_trouble``) raises NotReady (CNI code 11)."""
        if self._wait_for_sync and self._policy_wait > 0:
            revision = None  # unknown: the pass reads everything from etcd
            if self._revision:
                try:
                    revision = self._revision(what)
                except NetpluginError as e:
                    LOG.warning("event=policy.wait_revision endpoint=%s error=%s", what, e.msg)
            done = self._wait_for_sync(self._policy_wait, revision)
            trouble = self._trouble() if self._trouble else None
            if trouble:
                LOG.warning("event=policy.not_ready endpoint=%s reason=%s", what, trouble)
                raise NotReady(f"policy for {what} is not in place: {trouble}; try again later")
            if not done:
                LOG.warning("event=policy.wait_timeout endpoint=%s after_s=%s", what, self._policy_wait)

    def add(self, req):
        clock = self._metrics.clock("add")
        try:
            with self._lock.shared():
                ep, revision = self._service.add_recorded(req, clock=clock)
            if self._installed(ep, revision):
                clock.mark("policy_install")
            else:
                self.policy_ready(ep.id)
                clock.mark("policy_wait")
        except Exception as e:
            self._metrics.error("add", e)
            raise
        clock.done()
        return ep

    def _installed(self, ep, revision):
        if not (self._install and self._wait_for_sync and self._policy_wait > 0):
            return False
        if self._trouble and self._trouble():
            return False  # policy_ready answers NotReady
        started = time.monotonic()
        try:
            done = bool(self._install(ep, revision))
        except Exception as e:  # noqa: BLE001 - the fast path failing falls back to waiting for a sync pass
            LOG.warning("event=policy.install_failed endpoint=%s error=%s", ep.id, getattr(e, "msg", e))
            return False
        LOG.info(
            "event=policy.installed endpoint=%s fast=%s policy_ms=%.1f",
            ep.id,
            done,
            (time.monotonic() - started) * 1000,
        )
        return done

    def delete(self, ep_id, *args, **kw):
        if self._forget:
            self._forget(ep_id)
        clock = self._metrics.clock("del")
        try:
            with self._lock.shared():
                released = self._service.delete(ep_id, *args, clock=clock, **kw)
        except Exception as e:
            self._metrics.error("del", e)
            raise
        clock.done()
        return released

    def join_docker(self, spec, network, labels, mtu=None):
        """Under the shared lock across "make the veth" and "put the record": the dataplane reconciler, which
        holds the exclusive side, would otherwise see a veth no record names and delete it as a stray."""
        with self._lock.shared():
            return self._service.join_docker(spec, network, labels, mtu)

    def leave_docker(self, ep_id):
        with self._lock.shared():
            return self._service.leave_docker(ep_id)
