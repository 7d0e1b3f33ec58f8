"""The L7 engine's pure parts: route precedence, matches, filters, per-request weights, retries,
connectionPool accounting, the inference picker, and whole request plans with authorization."""

from __future__ import annotations

import random

import pytest

from ztunnel.api import authz
from ztunnel.api.config import (
    Authorization,
    AuthzCondition,
    AuthzMatch,
    ConnectionPoolPolicy,
    Endpoint,
    Header,
    HeaderModifier,
    HttpBackend,
    HttpMatch,
    HttpRoute,
    HttpRouteRule,
    InferencePool,
    Listener,
    NamedMatch,
    ProxyConfig,
    ProxyMode,
    RetryPolicy,
    Service,
    ServicePortMap,
    Stamp,
    StringMatch,
    UrlRewrite,
)
from ztunnel.api.outlier import Outcome
from ztunnel.proxy.l7 import picker, pool, retry
from ztunnel.proxy.l7.engine import Arrival, Forward, L7Index, Refuse, plan_request
from ztunnel.proxy.l7.routing import (
    RequestHead,
    draw_backend,
    gateway_parents,
    hostname_admits,
    rewrite_request,
    select_rule,
    service_parents,
)

HOST = "checkout.shop.svc.clusterset.local"
V2 = "checkout-v2.shop.svc.clusterset.local"
PARENT = f"Service/{HOST}:80"


def req(method: str = "GET", target: str = "/", host: str = HOST, **headers: str) -> RequestHead:
    return RequestHead(method, target, host, tuple((k.replace("_", "-"), v) for k, v in headers.items()))


def rule(*matches: HttpMatch, name: str = "", backends: tuple[HttpBackend, ...] = (HttpBackend("Service", HOST, 80),),
         **kw: object) -> HttpRouteRule:
    return HttpRouteRule(name=name, matches=matches, backends=backends, **kw)  # type: ignore[arg-type]


def route(*rules: HttpRouteRule, name: str = "r", parents: tuple[str, ...] = (PARENT,),
          hostnames: tuple[str, ...] = ()) -> HttpRoute:
    return HttpRoute("shop", name, "HTTPRoute", parents, rules, hostnames)


def path(kind: str, value: str) -> HttpMatch:
    return HttpMatch(path=StringMatch(kind, value))


# --- precedence and matching -------------------------------------------------------------------

@pytest.mark.parametrize(("target", "winner"), [
    ("/api/v1", "exact"),           # Exact beats every prefix
    ("/api/v1/x", "long-prefix"),   # the longer prefix wins
    ("/api/x", "short-prefix"),
    ("/other", "catch-all"),        # no matches = PathPrefix "/"
    ("/apix", "catch-all"),         # prefixes match whole segments
])
def test_path_precedence(target: str, winner: str) -> None:
    r = route(rule(name="catch-all"), rule(path("PathPrefix", "/api"), name="short-prefix"),
              rule(path("PathPrefix", "/api/v1"), name="long-prefix"), rule(path("Exact", "/api/v1"), name="exact"))
    choice = select_rule([r], service_parents(HOST, 80), req(target=target))
    assert choice is not None and choice.rule.name == winner


def test_method_then_headers_then_query_break_ties() -> None:
    r = route(rule(path("PathPrefix", "/a"), name="plain"),
              rule(HttpMatch(StringMatch("PathPrefix", "/a"), method="POST"), name="method"),
              rule(HttpMatch(StringMatch("PathPrefix", "/a"), headers=(NamedMatch("x-a", "1"),)), name="header"),
              rule(HttpMatch(StringMatch("PathPrefix", "/a"), query=(NamedMatch("q", "1"),)), name="query"))
    parents = service_parents(HOST, 80)
    assert select_rule([r], parents, req("POST", "/a", x_a="1")).rule.name == "method"  # type: ignore[union-attr]
    assert select_rule([r], parents, req("GET", "/a?q=1", x_a="1")).rule.name == "header"  # type: ignore[union-attr]
    assert select_rule([r], parents, req("GET", "/a?q=1")).rule.name == "query"  # type: ignore[union-attr]
    assert select_rule([r], parents, req("GET", "/a")).rule.name == "plain"  # type: ignore[union-attr]


def test_equal_rules_go_to_the_first_route_by_name_then_rule_order() -> None:
    a, b = route(rule(name="a0"), rule(name="a1"), name="a"), route(rule(name="b0"), name="b")
    assert select_rule([b, a], service_parents(HOST, 80), req()).rule.name == "a0"  # type: ignore[union-attr]


def test_regex_and_header_matches_are_whole_value_and_case_insensitive_names() -> None:
    r = route(rule(HttpMatch(StringMatch("RegularExpression", "/v[0-9]+/.*"),
                             headers=(NamedMatch("x-tenant", "acme|beta", "RegularExpression"),))))
    parents = service_parents(HOST, 80)
    assert select_rule([r], parents, req(target="/v2/x", x_tenant="beta"))
    assert select_rule([r], parents, req(target="/v2/x", x_tenant="betamax")) is None
    assert select_rule([r], parents, req(target="/xv2/x", x_tenant="acme")) is None


def test_routes_apply_only_to_their_parent_and_port() -> None:
    r = route(rule(), parents=(f"Service/{HOST}:8080",))
    assert select_rule([r], service_parents(HOST, 80), req()) is None
    assert select_rule([r], service_parents(HOST, 8080), req()) is not None


def test_gateway_hostnames() -> None:
    lst = Listener("ai/gw", "http", 80, hostname="*.example.com")
    r = route(rule(), parents=("Gateway/ai/gw/",), hostnames=("api.example.com",))
    parents = gateway_parents(lst)
    assert select_rule([r], parents, req(host="api.example.com:80"), lst) is not None
    assert select_rule([r], parents, req(host="www.example.com"), lst) is None
    assert hostname_admits("*.example.com", "a.b.example.com") and not hostname_admits("*.example.com", "example.com")


# --- filters and weights ---------------------------------------------------------------------------

def test_header_modifier_and_prefix_rewrite_keep_the_rest_and_the_query() -> None:
    r = route(rule(path("PathPrefix", "/api/v1"),
                   request_headers=HeaderModifier(set=(Header("x-a", "new"),), add=(Header("x-b", "2"),),
                                                  remove=("x-c",)),
                   rewrite=UrlRewrite(hostname="inner.local", path_kind="ReplacePrefixMatch", path="/v2")))
    choice = select_rule([r], service_parents(HOST, 80), req(target="/api/v1/items?id=7", x_a="old", x_b="1", x_c="3"))
    assert choice is not None
    out = rewrite_request(req(target="/api/v1/items?id=7", x_a="old", x_b="1", x_c="3"), choice)
    assert out.target == "/v2/items?id=7" and out.host == "inner.local"
    assert out.header("x-a") == "new" and out.header("x-b") == "1,2" and out.header("x-c") is None


def test_full_path_rewrite() -> None:
    r = route(rule(path("PathPrefix", "/old"), rewrite=UrlRewrite(path_kind="ReplaceFullPath", path="/new")))
    choice = select_rule([r], service_parents(HOST, 80), req(target="/old/deep?x=1"))
    assert choice is not None and rewrite_request(req(target="/old/deep?x=1"), choice).target == "/new?x=1"


def test_weights_are_drawn_per_request_and_hold_80_20() -> None:
    backends = (HttpBackend("Service", HOST, 80, 80), HttpBackend("Service", V2, 80, 20), HttpBackend("Service", "x", 80, 0))
    rnd = random.Random(7)
    counts: dict[str, int] = {}
    for _ in range(20_000):
        b = draw_backend(backends, rnd.random())
        assert b is not None
        counts[b.target] = counts.get(b.target, 0) + 1
    assert abs(counts[HOST] / 20_000 - 0.8) < 0.01 and "x" not in counts
    assert draw_backend((HttpBackend("Service", HOST, 80, 0),), 0.5) is None


# --- retries, outcomes, backoff ---------------------------------------------------------------------

@pytest.mark.parametrize(("status", "failure", "outcome"), [
    (503, None, Outcome.HTTP_GATEWAY_ERROR), (502, None, Outcome.HTTP_GATEWAY_ERROR), (504, None, Outcome.HTTP_GATEWAY_ERROR),
    (500, None, Outcome.HTTP_5XX), (404, None, Outcome.SUCCESS), (200, None, Outcome.SUCCESS),
    (None, retry.Failure.CONNECT, Outcome.CONNECT_FAILURE), (None, retry.Failure.RESET, Outcome.RESET_BEFORE_RESPONSE),
    (None, retry.Failure.TIMEOUT, Outcome.TIMEOUT), (None, retry.Failure.OVERFLOW, None),
])
def test_envoy_outcome_definitions(status: int | None, failure: retry.Failure | None, outcome: Outcome | None) -> None:
    assert retry.outlier_outcome(status, failure) == outcome


@pytest.mark.parametrize(("done", "status", "failure", "again"), [
    (0, 503, None, True), (1, 503, None, True), (2, 503, None, False),   # Istio: 2 retries
    (0, 500, None, False), (0, 502, None, False),                          # only 503 by default
    (0, None, retry.Failure.CONNECT, True), (0, None, retry.Failure.RESET, False),
    (0, None, retry.Failure.TIMEOUT, False),
])
def test_istio_default_retry_policy(done: int, status: int | None, failure: retry.Failure | None, again: bool) -> None:
    assert retry.retriable(RetryPolicy(), done, status, failure) is again


def test_route_retry_codes_and_zero_attempts() -> None:
    assert retry.retriable(RetryPolicy(3, (500, 502)), 2, 502, None)
    assert not retry.retriable(RetryPolicy(0), 0, 503, None)


def test_backoff_is_jittered_exponential_and_capped() -> None:
    p = RetryPolicy(backoff_s=0.025)
    assert retry.backoff_s(p, 1, 1.0) == pytest.approx(0.025)
    assert retry.backoff_s(p, 2, 1.0) == pytest.approx(0.075)
    assert retry.backoff_s(p, 10, 1.0) == pytest.approx(0.25)   # 10 × base
    assert retry.backoff_s(p, 3, 0.0) == 0.0


# --- connection pool -------------------------------------------------------------------------------

def test_connection_pool_opens_queues_and_overflows() -> None:
    b = pool.UpstreamBudget(ConnectionPoolPolicy(max_connections=2, http1_max_pending_requests=1,
                                                 max_requests_per_connection=3))
    assert [b.admit(), b.admit(), b.admit(), b.admit()] == [
        pool.Admission.OPEN, pool.Admission.OPEN, pool.Admission.WAIT, pool.Admission.OVERFLOW]
    assert (b.active, b.pending, b.overflows) == (2, 1, 1)
    b.released()
    b.granted()
    assert (b.active, b.pending) == (2, 0)
    assert b.reusable(2) and not b.reusable(3)
    assert pool.UpstreamBudget().admit() is pool.Admission.OPEN  # unset: unlimited


# --- inference picker ---------------------------------------------------------------------------------

METRICS = """# HELP vllm:num_requests_waiting
vllm:num_requests_waiting{model_name="llm"} 3
vllm:num_requests_running{model_name="llm"} 1
meshfed_model_info{model="llm-model-v1"} 1
"""


def ep(uid: str, healthy: bool = True) -> Endpoint:
    return Endpoint(uid, "east", "net", "10.0.0.1", 8000, "10.0.0.1:15008", healthy=healthy)


def test_metrics_parse() -> None:
    m = picker.parse_metrics(METRICS, 5.0)
    assert (m.waiting, m.running, m.models, m.scraped_at_s) == (3.0, 1.0, frozenset({"llm-model-v1"}), 5.0)
    lora = picker.parse_metrics('vllm:lora_requests_info{running_lora_adapters="a,b",max_lora="4"} 1\n', 0.0)
    assert lora.models == {"a", "b"}


def test_picker_least_queue_model_and_failure_modes() -> None:
    pool_ = InferencePool("ai", "p", (8000,), (ep("a"), ep("b"), ep("c"), ep("dead", healthy=False)), "epp", "FailClose")
    now = 10.0
    m = {"a": picker.PodMetrics(2, 0, frozenset({"v1"}), now), "b": picker.PodMetrics(0, 1, frozenset({"v2"}), now),
         "c": picker.PodMetrics(1, 0, frozenset({"v1"}), now)}
    assert picker.pick_endpoint(pool_, m, {}, "", now, 0.0).endpoint.workload_uid == "b"  # type: ignore[union-attr]
    assert picker.pick_endpoint(pool_, m, {}, "v1", now, 0.0).endpoint.workload_uid == "c"  # type: ignore[union-attr]
    # requests sent since the scrape count: c has 2 in flight now
    assert picker.pick_endpoint(pool_, m, {"c": 2}, "v1", now, 0.0).endpoint.workload_uid == "a"  # type: ignore[union-attr]
    missing = picker.pick_endpoint(pool_, m, {}, "v9", now, 0.0)
    assert missing.status == 404 and "v9" in missing.reason
    stale = picker.pick_endpoint(pool_, m, {}, "", now + 60, 0.0)
    assert stale.endpoint is None and stale.status == 503
    open_ = InferencePool("ai", "p", (8000,), (ep("a"),), "epp", "FailOpen")
    assert picker.pick_endpoint(open_, {}, {}, "", now, 0.3).endpoint.workload_uid == "a"  # type: ignore[union-attr]
    assert picker.model_of(b'{"model": "v1", "prompt": "x"}') == "v1" and picker.model_of(b"not json") == ""


# --- whole request plans ---------------------------------------------------------------------------------

def svc(host: str) -> Service:
    name, ns = host.split(".")[:2]
    return Service(host, ns, name, "", (ServicePortMap(80, 8080),), ())


def index(*routes: HttpRoute, authorizations: tuple[Authorization, ...] = ()) -> L7Index:
    cfg = ProxyConfig("waypoint/east/shop/waypoint", ProxyMode.WAYPOINT, "east", "net", "east.mesh",
                      Stamp(1, "x", 1), services=(svc(HOST), svc(V2)), http_routes=routes,
                      authorizations=authorizations)
    return L7Index.build(cfg)


PEER = authz.peer_from_identity("spiffe://east.mesh/ns/shop/sa/frontend")


def test_a_service_without_routes_goes_to_itself_with_istio_retries() -> None:
    ix = index()
    plan = plan_request(ix, Arrival(ix.services_by_host[HOST], 80), PEER, req(), 0.5)
    assert isinstance(plan, Forward) and plan.service is not None and plan.service.hostname == HOST
    assert plan.target_port == 8080 and plan.retry == RetryPolicy() and plan.rule is None


def test_routed_service_split_and_no_match_is_404() -> None:
    ix = index(route(rule(path("PathPrefix", "/api"), backends=(HttpBackend("Service", HOST, 80, 80),
                                                               HttpBackend("Service", V2, 80, 20)))))
    arrival = Arrival(ix.services_by_host[HOST], 80)
    a = plan_request(ix, arrival, PEER, req(target="/api"), 0.1)
    b = plan_request(ix, arrival, PEER, req(target="/api"), 0.9)
    assert isinstance(a, Forward) and isinstance(b, Forward)
    assert (a.backend.target, b.backend.target) == (HOST, V2)
    miss = plan_request(ix, arrival, PEER, req(target="/other"), 0.1)
    assert isinstance(miss, Refuse) and miss.status == 404 and "/other" in miss.reason


def test_deny_before_allow_with_request_fields_and_the_reason() -> None:
    deny = Authorization("no-delete", "shop", "DENY", (AuthzMatch(methods=("DELETE",)),), targets=("Service/shop/checkout",))
    allow = Authorization("frontend", "shop", "ALLOW",
                          (AuthzMatch(principals=("east.mesh/ns/shop/sa/frontend",), paths=("/api/*",),
                                      when=(AuthzCondition("request.headers[x-user]", ("alice", "bob")),)),),
                          targets=("Service/shop/checkout",))
    ix = index(authorizations=(deny, allow))
    arrival = Arrival(ix.services_by_host[HOST], 80)
    denied = plan_request(ix, arrival, PEER, req("DELETE", "/api/x", x_user="alice"), 0.5)
    assert isinstance(denied, Refuse) and denied.status == 403 and denied.policy == "shop/no-delete"
    assert "denied by DENY policy shop/no-delete" in denied.reason and "method DELETE" in denied.reason
    assert denied.body == b"RBAC: access denied"
    assert isinstance(plan_request(ix, arrival, PEER, req("GET", "/api/x", x_user="bob"), 0.5), Forward)
    no_user = plan_request(ix, arrival, PEER, req("GET", "/api/x"), 0.5)
    assert isinstance(no_user, Refuse) and "no ALLOW policy matched" in no_user.reason
    other = authz.peer_from_identity("spiffe://east.mesh/ns/shop/sa/intruder")
    assert isinstance(plan_request(ix, arrival, other, req("GET", "/api/x", x_user="bob"), 0.5), Refuse)
    # a policy for another service does not apply here
    ix2 = index(authorizations=(Authorization("x", "shop", "DENY", (AuthzMatch(),), targets=("Service/shop/cart",)),))
    assert isinstance(plan_request(ix2, Arrival(ix2.services_by_host[HOST], 80), PEER, req(), 0.5), Forward)


def test_ztunnel_reads_request_fields_fail_closed() -> None:
    """The same policy at L4 (no request): DENY with methods matches every connection, ALLOW with
    paths never matches (Istio's ztunnel)."""
    deny = Authorization("d", "shop", "DENY", (AuthzMatch(methods=("DELETE",)),))
    allow = Authorization("a", "shop", "ALLOW", (AuthzMatch(paths=("/x",)),))
    assert not authz.evaluate([deny], peer=PEER, dest_namespace="shop", dest_labels={}, port=80,
                          local_trust_domain="east.mesh").allowed
    assert not authz.evaluate([allow], peer=PEER, dest_namespace="shop", dest_labels={}, port=80,
                          local_trust_domain="east.mesh").allowed
    targeted = Authorization("t", "shop", "DENY", (AuthzMatch(),), targets=("Service/shop/checkout",))
    assert authz.evaluate([targeted], peer=PEER, dest_namespace="shop", dest_labels={}, port=80,
                          local_trust_domain="east.mesh").allowed


def test_paths_hosts_and_not_values() -> None:
    r = authz.Request("GET", "/api/v1/x", "Checkout.shop:80", {"x-env": "prod"})
    assert authz.request_fields_match(AuthzMatch(paths=("/api/*",), hosts=("checkout.shop",)), r)
    assert authz.request_fields_match(AuthzMatch(paths=("*/x",)), r)
    assert not authz.request_fields_match(AuthzMatch(not_paths=("/api/*",)), r)
    assert not authz.request_fields_match(AuthzMatch(when=(AuthzCondition("request.headers[x-env]", (), ("prod",)),)), r)
    assert authz.request_fields_match(AuthzMatch(when=(AuthzCondition("request.headers[x-other]", (), ("prod",)),)), r)
