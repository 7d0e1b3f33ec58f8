"""The built-in inference endpoint picker: which model-server pod of an InferencePool serves a
request. Pure: the metrics, our own in-flight counts, `now_s` and a random float come in.

The Gateway API Inference Extension leaves the choice to an endpoint picker (EPP) named by the
pool's `endpointPickerRef`; meshfed answers for it with this picker (whatever the name), modelled
on the reference EPP's default scorer:

- candidates are the pool's ready pods (not ejected by outlier detection);
- model-name routing: when the request names a model (`"model"` in the OpenAI-style JSON body),
  only pods that serve it compete; a pod whose metrics list no model serves any. No pod serving
  the model → 404 naming it (a client error, not a capacity problem);
- the pod with the smallest queue wins: `vllm:num_requests_waiting` from its metrics endpoint plus
  the requests this proxy sent it since that scrape (so a burst between scrapes spreads); ties by
  running requests, then at random;
- when no candidate has fresh metrics (none scraped within `stale_after_s`), `failureMode` decides:
  FailOpen picks a ready pod at random, FailClose answers 503 (the picker cannot decide).

Metrics are Prometheus text (`parse_metrics`): `vllm:num_requests_waiting`,
`vllm:num_requests_running`, and the models served as `vllm:lora_requests_info{running_lora_adapters=
"a,b"}` or meshfed's `meshfed_model_info{model="m"} 1`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from ztunnel.api.config import Endpoint, InferencePool

DEFAULT_STALE_AFTER_S = 5.0
MAX_MODEL_BODY_BYTES = 1 << 20
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class PodMetrics:
    waiting: float
    running: float
    models: frozenset[str]
    scraped_at_s: float


@dataclass(frozen=True, slots=True)
class Pick:
    endpoint: Endpoint | None
    status: int          # 200 when an endpoint was picked
    reason: str


def parse_metrics(text: str, now_s: float) -> PodMetrics:
    waiting = running = 0.0
    models: set[str] = set()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels_text, value_text = m.group(1), m.group(2) or "", m.group(3)
        try:
            value = float(value_text)
        except ValueError:
            continue
        labels = dict(_LABEL.findall(labels_text))
        if name == "vllm:num_requests_waiting":
            waiting += value
        elif name == "vllm:num_requests_running":
            running += value
        elif name == "meshfed_model_info" and value > 0 and labels.get("model"):
            models.add(labels["model"])
        elif name == "vllm:lora_requests_info":
            models.update(x for x in labels.get("running_lora_adapters", "").split(",") if x)
            if labels.get("model_name"):
                models.add(labels["model_name"])
    return PodMetrics(waiting, running, frozenset(models), now_s)


def model_of(body: bytes) -> str:
    """The model an OpenAI-style request names ("" when none, or the body is not JSON)."""
    if not body or len(body) > MAX_MODEL_BODY_BYTES or body[:1] not in (b"{", b" ", b"\n"):
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else ""


def pick_endpoint(pool: InferencePool, metrics: Mapping[str, PodMetrics], in_flight: Mapping[str, int],
                  model: str, now_s: float, rand: float, ejected: Collection[str] = frozenset(),
                  exclude: Collection[str] = frozenset(),
                  stale_after_s: float = DEFAULT_STALE_AFTER_S) -> Pick:
    ready = [e for e in pool.endpoints
             if e.healthy and e.workload_uid not in ejected and e.workload_uid not in exclude]
    if not ready:
        return Pick(None, 503, f"no ready pod in InferencePool {pool.key}")
    fresh = {e.workload_uid: metrics[e.workload_uid] for e in ready
             if e.workload_uid in metrics and now_s - metrics[e.workload_uid].scraped_at_s <= stale_after_s}
    if not fresh:
        if pool.failure_mode == "FailOpen":
            e = ready[min(len(ready) - 1, int(rand * len(ready)))]
            return Pick(e, 200, f"picker has no fresh metrics for {pool.key}: FailOpen, picked at random")
        return Pick(None, 503, f"picker has no fresh metrics for any pod of {pool.key} (failureMode FailClose)")
    candidates = [e for e in ready if e.workload_uid in fresh]
    if model:
        serving = [e for e in candidates if not fresh[e.workload_uid].models or model in fresh[e.workload_uid].models]
        if not serving:
            served = sorted({x for m in fresh.values() for x in m.models})
            return Pick(None, 404, f"model {model!r} is not served by InferencePool {pool.key} "
                                   f"(served: {', '.join(served) or 'none'})")
        candidates = serving

    def score(e: Endpoint) -> tuple[float, float]:
        m = fresh[e.workload_uid]
        return (m.waiting + in_flight.get(e.workload_uid, 0), m.running)

    best = min(score(e) for e in candidates)
    tied = [e for e in candidates if score(e) == best]
    chosen = tied[min(len(tied) - 1, int(rand * len(tied)))]
    return Pick(chosen, 200, f"least queue ({best[0]:g} waiting) among {len(candidates)} pod(s)"
                + (f" serving {model}" if model else ""))
