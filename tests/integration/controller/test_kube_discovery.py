"""Discovery with the real kubernetes client against the emulated API server (kmock)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusters.kube.discovery import KubeDiscovery
from clusters.kube.observation import ClusterObservation
from clusters.lab.apiserver import EmulatedApiServer
from tests.integration.controller import kobjects as k


@pytest.fixture()
def apiserver() -> Iterator[EmulatedApiServer]:
    with EmulatedApiServer() as srv:
        yield srv


def seed(srv: EmulatedApiServer) -> None:
    srv.apply(k.namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
    srv.apply(k.namespace("other"))
    srv.apply(k.node("n1", "127.0.1.1", zone="za"))
    srv.apply(k.node("n2", "127.0.1.2", zone="zb"))
    srv.apply(k.service("shop", "checkout"))
    srv.apply(k.service("other", "ignored"))
    srv.apply(k.pod("shop", "checkout-1", "n1", "10.1.0.1", sa="checkout"))
    srv.apply(k.pod("shop", "checkout-2", "n2", "10.1.0.2", sa="checkout"))
    srv.apply(k.endpoint_slice("shop", "checkout", [("checkout-1", "10.1.0.1", "n1"), ("checkout-2", "10.1.0.2", "n2")]))
    srv.apply(k.endpoint_slice("other", "ignored", [("x", "10.9.0.1", "n1")]))


def test_list_gives_complete_observation(apiserver: EmulatedApiServer, tmp_path: Path) -> None:
    seed(apiserver)
    kc = apiserver.write_kubeconfig(tmp_path / "kubeconfig", "lab-a")
    disc = KubeDiscovery("a", str(kc), "lab-a", namespace_selector="istio.io/dataplane-mode=ambient")
    obs = disc.list_all()
    assert obs.complete and obs.cluster == "a"
    assert [n.name for n in obs.nodes] == ["n1", "n2"]
    assert [(s.namespace, s.name) for s in obs.services] == [("shop", "checkout")]  # selector applied by us
    eps = {e.pod: e for e in obs.endpoints}
    assert set(eps) == {"checkout-1", "checkout-2"}
    assert eps["checkout-2"].node == "n2" and eps["checkout-2"].zone == "zb"
    assert eps["checkout-1"].service_account == "checkout"
    assert eps["checkout-1"].ports[0].port == 80 and eps["checkout-1"].ports[0].target_port == 8080


def test_watch_sees_changes_and_deletions(apiserver: EmulatedApiServer, tmp_path: Path) -> None:
    seed(apiserver)
    kc = apiserver.write_kubeconfig(tmp_path / "kubeconfig", "lab-a")
    disc = KubeDiscovery("a", str(kc), "lab-a", watch_timeout_s=5)
    seen: list[ClusterObservation] = []
    changed = threading.Event()

    def on_change(obs: ClusterObservation) -> None:
        seen.append(obs)
        changed.set()

    disc.start(on_change)
    try:
        deadline = time.monotonic() + 10
        while not (seen and seen[-1].complete) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen[-1].complete
        changed.clear()
        apiserver.apply(k.endpoint_slice("shop", "checkout", [("checkout-1", "10.1.0.1", "n1")]), replace=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pods = {e.pod for e in disc.observation().endpoints if e.service == "checkout"}
            if pods == {"checkout-1"}:
                break
            time.sleep(0.02)
        assert pods == {"checkout-1"}
        assert disc.last_success_s is not None
    finally:
        disc.stop()


def test_unreachable_context_names_the_fix(tmp_path: Path) -> None:
    from clusters.kube.discovery import DiscoveryError

    with pytest.raises(DiscoveryError, match="lab-missing"):
        KubeDiscovery("a", str(tmp_path / "nope"), "lab-missing").list_all()
