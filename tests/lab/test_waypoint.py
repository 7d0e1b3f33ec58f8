"""Waypoints, request-level policy, the ingress Gateway and inference routing on the lab (root).

One lab of `examples/l7` for the module (two clusters on two networks, the controller, a waypoint
per enrolled namespace and cluster, an ingress gateway in east). The tests run in file order and
leave the lab healthy for the next. What is proven (the issue's "done when"):

- every proxy, the waypoints and the ingress gateway included, is SYNCED at the fleet revision;
- the canary split is per request: 2,000 requests on ONE keep-alive connection split 80/20 within
  ±3 %, and the pods see the caller's identity, not the waypoint's;
- a request-level DENY (DELETE on checkout) is enforced at the waypoint, and its access log names
  the policy and the reason;
- east's checkout answering 503 is ejected by 5xx outlier detection at the waypoint and east's
  traffic fails over to west through the east-west gateways with 0 failed requests after the
  ejection; the controller's failover history records EndpointEjected and FailedOver with the
  DestinationRule's file and the commit (the same health path as L4);
- the guide's DestinationRule, pasted unchanged, works: a pod answering 503 is ejected after its
  consecutive5xxErrors (maxEjectionPercent 10 % of 10 hosts: one), with no failed request;
- the guide's inference route, pasted unchanged, serves through the ingress Gateway with its 20/80
  model-version split; the InferencePool's picker honours the model name; and with east's model
  servers down the ingress fails over to west.
Figures are printed (`-s`), assertions keep margins for a shared 2-core machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chaos.demo import LabFederation, between
from chaos.waypoint import (
    GUIDE_URL,
    canary_split,
    delete_denied,
    fail_version,
    inference,
    models,
    proxy_log,
)

REPO = Path(__file__).resolve().parents[2]
FLEET = REPO / "examples" / "l7"
STATE_DIR = Path(os.environ.get("MESHFED_L7_STATE_DIR", "/tmp/meshfed-l7"))

pytestmark = pytest.mark.timeout(900)


def _print(*parts: Any) -> None:
    print("[l7]", *parts, flush=True)


@pytest.fixture(scope="module")
def fed() -> Iterator[LabFederation]:
    from clusters.lab.layout import LabError

    f = LabFederation(FLEET, STATE_DIR)
    try:
        lab = f.up(up_timeout_s=300)
    except LabError as e:
        if "already running" in str(e):
            pytest.fail(f"{e} (or set MESHFED_L7_STATE_DIR to run beside it)")
        f.down()
        raise
    except BaseException:
        f.down()
        raise
    try:
        _, took_s = f.wait_converged(timeout_s=300)
        _print(f"lab up in {lab.get('up_wall_s')} s, converged {took_s:.1f} s later")
        yield f
    finally:
        f.down()


# --- the tests, in order ------------------------------------------------------------------------------


def test_every_proxy_including_waypoints_and_the_ingress_is_synced(fed: LabFederation) -> None:
    st = fed.status()
    assert st is not None
    proxies = {p["proxy"]: p["sync"] for p in st["proxies"]}
    assert {"waypoint/east/shop/waypoint", "waypoint/west/shop/waypoint", "waypoint/east/my-app/waypoint",
            "waypoint/west/my-app/waypoint", "ingress/east/ai-serving/ai-gateway"} <= set(proxies)
    assert set(proxies.values()) == {"SYNCED"}, proxies


def test_canary_split_holds_per_request_on_one_connection(fed: LabFederation) -> None:
    split = canary_split(fed, "east", 2000)
    _print(f"canary split over {split.requests} requests on one connection in {split.seconds:.1f} s: "
           f"{split.by_workload} (v2 {split.share('checkout-v2'):.1%})")
    assert split.codes == {"200": split.requests}, split
    assert abs(split.share("checkout-v2") - 0.20) <= 0.03, split.by_workload
    # the pods saw the caller through the waypoint, not the waypoint's own identity
    assert split.identities == {"spiffe://east.mesh.local/ns/shop/sa/frontend": split.requests}


def test_delete_is_denied_at_the_waypoint_with_the_reason_logged(fed: LabFederation) -> None:
    res, line = delete_denied(fed, "east")
    assert res["codes"] == {"403": 3} and res["bodies"][0] == "RBAC: access denied", res
    _print(f"access log of the denial: {line}")
    assert line is not None
    assert line["policy"] == "shop/checkout-deny-delete" and line["method"] == "DELETE"
    assert "denied by DENY policy shop/checkout-deny-delete" in line["reason"]
    assert line["src"] == "spiffe://east.mesh.local/ns/shop/sa/frontend"
    ok = canary_split(fed, "east", 3)
    assert ok.codes == {"200": 3}


def test_a_503_version_is_ejected_and_fails_over_to_west_through_the_waypoint(fed: LabFederation) -> None:
    f = fail_version(fed, "east", ["checkout-0", "checkout-1"], "checkout")
    _print(f"503 in east: {f.requests} requests to checkout during the fault, {f.failed} failed; ejected "
           f"{f.ejected} {f.ejected_after_ms:.0f} ms after the fault; {f.after_ejection} requests after the "
           f"ejection, {f.failed_after} failed, served by {f.served_after}; history {f.kinds}")
    assert f.ejected == ["east/shop/checkout-0", "east/shop/checkout-1"], f
    assert f.after_ejection > 20 and f.failed_after == 0 and f.served_after == ["west"], f
    assert f.failed == 0, f   # retries on the other hosts hid the 503s before the ejection too
    # the controller: the waypoint's health reports -> the vote -> the failover engine
    ejected = [e for e in f.history if e["kind"] == "EndpointEjected"]
    over = next((e for e in f.history if (e["kind"], e["from_cluster"], e["to_cluster"]) == ("FailedOver", "east", "west")),
                None)
    assert ejected and over is not None, f.kinds
    revision = fed.status()["applied"]["revision"]  # type: ignore[index]
    for e in (ejected[0], over):
        assert e["policy_file"].startswith("policies/shop/checkout.yaml:") and e["revision"] == revision, e
    assert "health reports" in ejected[0]["trigger"], ejected[0]


def test_the_guides_destination_rule_ejects_a_503_pod(fed: LabFederation) -> None:
    f = fail_version(fed, "east", ["my-service-0"], "my-service", namespace="my-app", url=GUIDE_URL,
                     service="my-app/my-service", hold_s=8.0)
    _print(f"guide DR: {f.requests} requests during the fault, {f.failed} failed; waypoint ejected {f.ejected}; "
           f"history {f.kinds}")
    assert f.ejected == ["east/my-app/my-service-0"] and f.failed == 0, f
    line = next(e for e in proxy_log(fed, "waypoint/east/my-app/waypoint")
                if e.get("kind") == "EndpointEjected" and e.get("enforced") and float(e["ts"]) >= f.fault_at_s - 1)
    assert line["reason"] == "Consecutive5xxErrors" and line["consecutive"] == 3
    records = fed.records("east-my-service")
    assert not [r for r in between(records, float(line["ts"]) + 0.5, f.heal_at_s) if r.get("pod") == "my-service-0"]
    ejected = [e for e in f.history if e["kind"] == "EndpointEjected"]
    assert ejected and ejected[0]["policy_file"].startswith("policies/my-app/my-service-multicluster.yaml:"), f.kinds


def test_ingress_serves_the_guides_inference_route_and_the_pool(fed: LabFederation) -> None:
    n = 400
    split = models(inference(fed, n))
    _print(f"guide's inference route through ai-gateway, {n} requests: {split}")
    assert set(split) == {"llm-model-v1", "llm-model-v2"}, split
    assert abs(split["llm-model-v2"] / n - 0.20) <= 0.06, split
    for model in ("llm-model-v1", "llm-model-v2"):
        got = inference(fed, 20, "/v1/chat/completions", model)
        _print(f"InferencePool, model {model}: {got}")
        assert all(k.startswith(f"200 {model} east/{model}-") for k in got), got
    both = inference(fed, 40, "/v1/chat/completions", "llm-model-v1")
    assert len({k.split("/")[-1] for k in both}) == 2, both  # the picker spreads over both v1 pods
    [missing] = inference(fed, 1, "/v1/chat/completions", "no-such-model")
    assert missing.startswith("404 model 'no-such-model'"), missing


def test_the_ingress_fails_over_to_west_when_no_local_backend_is_healthy(fed: LabFederation) -> None:
    fed.fault("kill", "pod", ["east/ai-serving/llm-model-v1-[0-9]*"], label="kill v1 in east", cluster="east")
    try:
        deadline = time.monotonic() + 30.0
        got: dict[str, int] = {}
        while time.monotonic() < deadline:
            got = inference(fed, 20)
            v1 = {k: v for k, v in got.items() if " llm-model-v1 " in k}
            if v1 and all(" west/" in k for k in v1):
                break
            time.sleep(1.0)
        _print(f"east's v1 model servers down: {got}")
        assert any(" llm-model-v1 west/" in k for k in got), got
        settled = inference(fed, 50)
        _print(f"after the shift: {settled}")
        assert all(k.startswith("200 ") for k in settled), settled
        assert all(" west/" in k for k in settled if " llm-model-v1 " in k), settled
    finally:
        fed.heal("pod", ["east/ai-serving/llm-model-v1-[0-9]*"], label="kill v1 in east", cluster="east")
