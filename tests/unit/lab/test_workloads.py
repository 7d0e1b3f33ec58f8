"""Pure parts of the lab's workloads: PROXY v2 identity headers, load outcomes, kubelet objects."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusters.lab.demo_server import ProxyHeaderError, build_proxy_v2, parse_proxy_v2
from clusters.lab.kubelet import Kubelet, NodeState, PodPhase, PodState, desired_objects
from clusters.lab.loadgen import FAIL, INDETERMINATE, OK, classify
from clusters.lab.topology import plan_lab
from tests.unit.lab.fleet_fixture import fleet


@given(ident=st.text(min_size=0, max_size=200), sport=st.integers(1, 65535), dport=st.integers(1, 65535))
def test_proxy_v2_round_trips_the_peer_identity(ident: str, sport: int, dport: int) -> None:
    hdr = build_proxy_v2(("10.10.1.11", sport), ("10.20.1.11", dport), ident)
    info = parse_proxy_v2(hdr[:16], hdr[16:])
    assert info.peer_identity == ident
    assert info.source == f"10.10.1.11:{sport}" and info.destination == f"10.20.1.11:{dport}"


def test_proxy_v2_rejects_garbage() -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_v2(b"GET / HTTP/1.1\r\n", b"")


@pytest.mark.parametrize("connected, sent, status, error, expected", [
    (True, True, 200, "", OK),
    (True, True, 503, "", FAIL),
    (False, False, 0, "ConnectionRefusedError", FAIL),
    (False, False, 0, "timeout", FAIL),          # never connected: provably not served
    (True, False, 0, "ConnectionResetError", FAIL),
    (True, True, 0, "timeout", INDETERMINATE),   # written, no answer: may have been served
    (True, True, 0, "IncompleteReadError", INDETERMINATE),
])
def test_outcome_classification(connected: bool, sent: bool, status: int, error: str, expected: str) -> None:
    assert classify(connected, sent, status, error) == expected


def test_kubelet_objects_follow_process_state() -> None:
    plan = plan_lab(*fleet())
    east = plan.cluster("east")
    dead = east.pods[0]
    states = {p.key: PodState(PodPhase.RUNNING, True) for p in east.pods}
    states[dead.key] = PodState(PodPhase.FAILED, False)
    objs = desired_objects(east, states, {"node-1": NodeState(True), "node-2": NodeState(False)})
    pod = objs[f"Pod/{dead.namespace}/{dead.name}"]
    assert pod["status"]["phase"] == "Failed" and pod["status"]["conditions"][0]["status"] == "False"
    assert pod["status"]["podIP"] == dead.address and pod["spec"]["nodeName"] == dead.node
    eps = objs[f"EndpointSlice/shop/{dead.service}-lab"]["endpoints"]
    by_pod = {e["targetRef"]["name"]: e["conditions"]["ready"] for e in eps}
    assert by_pod[dead.name] is False and sum(by_pod.values()) == len(by_pod) - 1
    assert objs["Node//node-2"]["status"]["conditions"][0]["status"] == "False"
    assert objs["Node//node-1"]["metadata"]["labels"]["topology.kubernetes.io/zone"] == "us-east-1a"
    svc = objs["Service/shop/checkout"]
    assert svc["spec"]["clusterIP"] == next(v.cluster_ip for v in east.services if v.name == "checkout")
    # namespaces come first: the emulator needs them before namespaced objects
    assert next(iter(objs)).startswith("Namespace/")


def test_a_kubelet_pass_that_raises_does_not_end_the_kubelet() -> None:
    """A probe that raises once (a pod racing its own restart) must not kill the kubelet thread:
    the cluster's API would keep saying whatever it said last (a healed pod never Ready again)."""
    plan = plan_lab(*fleet())
    east = plan.cluster("east")
    written: list[dict[str, Any]] = []

    class Api:
        def apply(self, obj: Mapping[str, Any], replace: bool = False) -> dict[str, Any]:
            written.append(dict(obj))
            return dict(obj)

    stop = threading.Event()
    calls = [0]

    def probe_pods() -> dict[str, PodState]:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("probe raced a restart")
        if calls[0] >= 3:
            stop.set()
        return {p.key: PodState(PodPhase.RUNNING, True) for p in east.pods}

    k = Kubelet(east, Api(), probe_pods, lambda: {n.name: NodeState(True) for n in east.nodes})
    t = threading.Thread(target=k.run, args=(stop, 0.001), daemon=True)
    t.start()
    t.join(5.0)
    assert not t.is_alive() and calls[0] >= 3, "the kubelet loop ended at the first failed pass"
    assert k.failed_passes == 1 and "probe raced a restart" in k.last_error
    slices = [o for o in written if o["kind"] == "EndpointSlice"]
    assert slices and all(e["conditions"]["ready"] for s in slices for e in s["endpoints"])


@pytest.mark.parametrize("status, ok_status, expected", [
    (403, 403, OK),      # a denied method probe: the refusal is the right answer
    (200, 403, FAIL),    # ... and a 2xx means the policy let it through
    (503, 403, FAIL),
    (204, 0, OK),        # default: any 2xx
])
def test_an_expected_status_is_the_one_ok_answer(status: int, ok_status: int, expected: str) -> None:
    assert classify(True, True, status, "", ok_status) == expected
