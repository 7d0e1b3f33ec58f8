"""`meshfed_*` metrics, served by the controller process with prometheus-client directly.

Ray's own metrics system renames and duplicates series, so the controller keeps its own
registry (no default process/platform collectors, `_created` series disabled) and builds every
series at scrape time from the latest status document (`StatusCollector`): one source of truth
for the status API, the CLI and /metrics, and no counters to keep in step across actors.
Label values are bounded: clusters, proxies, services and trust domains come from the fleet repo
or from discovery, never from request data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatusCollector:
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        st = self._status() or {}
        rec = st.get("reconciler", {})
        desired, applied = st.get("desired") or {}, st.get("applied") or {}

        info = GaugeMetricFamily("meshfed_revision_info", "Fleet revisions: desired (last attempted) and applied",
                                 labels=["kind", "revision", "ok"])
        if desired:
            info.add_metric(["desired", str(desired.get("revision", "")), str(bool(desired.get("ok"))).lower()], 1)
        if applied:
            info.add_metric(["applied", str(applied.get("revision", "")), "true"], 1)
        applying = st.get("applying") or {}
        if applying:
            info.add_metric(["applying", str(applying.get("revision", "")), "true"], 1)
        yield info
        yield _gauge("meshfed_fleet_problems", "Problems of the last attempted revision", len(st.get("problems") or []))

        yield _counter("meshfed_reconciles_total", "Reconcile runs", rec.get("reconciles", 0))
        durs = [float(d) for d in rec.get("durations_s", [])]
        h = HistogramMetricFamily("meshfed_reconcile_duration_seconds", "Duration of recent reconcile runs")
        buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
        h.add_metric([], [(str(b), sum(1 for d in durs if d <= b)) for b in buckets] + [("+Inf", len(durs))], sum(durs))
        yield h
        yield _counter("meshfed_reconcile_step_failures_total", "Guarded reconcile steps that failed",
                       rec.get("step_failures_total", 0))
        loop = rec.get("loop") or {}
        yield _counter("meshfed_reconcile_loop_failures_total", "Reconcile loop turns that raised (the loop went on)",
                       loop.get("failures_total", 0))
        # a timestamp, not an age: alert on `time() - meshfed_reconcile_last_step_timestamp_seconds > 30`
        yield _gauge("meshfed_reconcile_last_step_timestamp_seconds", "When the reconcile loop last completed a step",
                     float(loop.get("last_step_at_s") or 0.0))

        up = GaugeMetricFamily("meshfed_cluster_up", "1 when the cluster's lease is valid", labels=["cluster"])
        lease = GaugeMetricFamily("meshfed_cluster_lease_remaining_seconds", "Seconds left on the cluster's lease",
                                  labels=["cluster"])
        eps = GaugeMetricFamily("meshfed_endpoints", "Discovered endpoints by cluster and health",
                                labels=["cluster", "health"])
        for name, c in sorted((st.get("clusters") or {}).items()):
            up.add_metric([name], 1 if c.get("up") else 0)
            lease.add_metric([name], float(c.get("lease_remaining_s") or 0))
            ready = int(c.get("ready_endpoints") or 0)
            eps.add_metric([name, "ready"], ready)
            eps.add_metric([name, "not_ready"], int(c.get("endpoints") or 0) - ready)
        yield up
        yield lease
        yield eps
        yield _gauge("meshfed_endpoints_ejected_globally", "Endpoints a quorum of proxies ejects",
                     len(rec.get("unhealthy_endpoints") or []))

        cs = st.get("config_server") or {}
        # from the assembled list: a proxy whose newest config is undelivered is not SYNCED here either
        counts = {state: 0 for state in (cs.get("counts") or {"SYNCED": 0, "STALE": 0, "NOT SENT": 0})}
        for p in st.get("proxies") or []:
            counts[p.get("sync", "")] = counts.get(p.get("sync", ""), 0) + 1
        sync = GaugeMetricFamily("meshfed_proxy_sync", "Proxies by sync state", labels=["state"])
        for state, n in sorted(counts.items()):
            sync.add_metric([state], n)
        yield sync
        yield _gauge("meshfed_configs_undelivered", "Rendered configs the config service has not accepted yet",
                     int(rec.get("undelivered") or 0))
        per = GaugeMetricFamily("meshfed_proxy_synced", "1 when the proxy runs the desired config",
                                labels=["proxy"])
        for p in st.get("proxies") or []:
            per.add_metric([p["proxy"]], 1 if p.get("sync") == "SYNCED" else 0)
        yield per
        yield _counter("meshfed_pushes_total", "Config pushes sent to proxies", cs.get("pushes", 0))
        yield _counter("meshfed_acks_total", "ACKs received", cs.get("acks", 0))
        yield _counter("meshfed_nacks_total", "NACKs received", cs.get("nacks", 0))
        yield _counter("meshfed_stale_epoch_refusals_total", "Proxies refused because they follow a newer epoch",
                       cs.get("stale_epoch_refusals", 0))
        yield _counter("meshfed_health_reports_total", "Health reports received", cs.get("health_reports", 0))
        ack = HistogramMetricFamily("meshfed_push_to_ack_seconds", "Push sent to ACK received, recent pushes")
        lat = [float(x) for x in cs.get("recent_ack_latencies_s", [])]
        ack.add_metric([], [(str(b), sum(1 for d in lat if d <= b)) for b in buckets] + [("+Inf", len(lat))], sum(lat))
        yield ack
        yield _counter("meshfed_failover_events_total", "Failover events recorded", st.get("failover_events", 0))
        yield _counter("meshfed_ejections_detected_total", "Ejections detected by the core",
                       rec.get("ejections_detected", 0))
        yield _counter("meshfed_ejections_enforced_total", "Ejections enforced by the core",
                       rec.get("ejections_enforced", 0))
        exp = GaugeMetricFamily("meshfed_trust_bundle_expiry_timestamp_seconds",
                                "Not-after of each CA root (unix seconds)", labels=["trust_domain", "root"])
        for r in st.get("trust") or []:
            exp.add_metric([r["trust_domain"], r["root"]], float(r["not_after_s"]))
        yield exp


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


def make_registry(status: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatusCollector(status))
    return reg


def render(registry: CollectorRegistry) -> bytes:
    return bytes(generate_latest(registry))
