"""The emulated API server's ServiceAccount tokens (`clusters.lab.tokens`) and the lab kubelet's
projected tokens (`clusters.lab.kubelet.TokenProjector`): pure, with injected clocks."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from clusters.lab.kubelet import (
    ProjectedVolume,
    TokenProjector,
    desired_objects,
    proxy_volumes,
    token_refresh_due,
)
from clusters.lab.tokens import TokenAuthority, TokenRequestError, claims_unverified
from clusters.lab.topology import plan_lab
from tests.unit.lab.fleet_fixture import fleet


class Clock:
    def __init__(self, now_s: float = 1_800_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


POD = {"metadata": {"name": "ztunnel-node-1", "namespace": "meshfed-system", "uid": "u-1"},
       "spec": {"nodeName": "node-1", "serviceAccountName": "ztunnel"}}


def pods(*known: dict[str, Any]) -> Any:
    table = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in known}
    return lambda ns, name: table.get((ns, name))


def request(auth: TokenAuthority, find: Any = None, sa: str = "ztunnel", expiration_s: int = 3600,
            audiences: tuple[str, ...] = ("meshfed-controller",)) -> str:
    body = {"spec": {"audiences": list(audiences), "expirationSeconds": expiration_s,
                     "boundObjectRef": {"kind": "Pod", "name": "ztunnel-node-1"}}}
    return str(auth.token_request("meshfed-system", sa, body, find or pods(POD))["status"]["token"])


def test_a_minted_token_reviews_with_its_pod_and_node() -> None:
    auth = TokenAuthority("https://a", clock=Clock())
    status = auth.review(request(auth), ["meshfed-controller"], pods(POD))
    assert status["authenticated"] and status["audiences"] == ["meshfed-controller"]
    user = status["user"]
    assert user["username"] == "system:serviceaccount:meshfed-system:ztunnel"
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == ["ztunnel-node-1"]
    assert user["extra"]["authentication.kubernetes.io/pod-uid"] == ["u-1"]
    assert user["extra"]["authentication.kubernetes.io/node-name"] == ["node-1"]


def test_review_refuses_what_the_server_did_not_issue_or_no_longer_vouches_for() -> None:
    clock = Clock()
    auth, other = TokenAuthority("https://a", clock=clock), TokenAuthority("https://a", clock=clock)
    token = request(auth)
    assert "signature" in other.review(token, ["meshfed-controller"], pods(POD))["error"]   # another server's key
    head, _body, sig = token.split(".")
    claims = claims_unverified(token)
    claims["kubernetes.io"]["node"]["name"] = "node-2"    # claim another node, keep the signature
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert "signature" in auth.review(f"{head}.{body}.{sig}", ["meshfed-controller"], pods(POD))["error"]
    assert "audiences" in auth.review(token, ["https://kubernetes.default.svc"], pods(POD))["error"]
    assert "no longer exists" in auth.review(token, ["meshfed-controller"], pods())["error"]
    recreated = {**POD, "metadata": {**POD["metadata"], "uid": "u-2"}}
    assert "no longer exists" in auth.review(token, ["meshfed-controller"], pods(recreated))["error"]
    clock.now_s += 3600
    assert "expired" in auth.review(token, ["meshfed-controller"], pods(POD))["error"]
    assert not auth.review("a.b", [], pods(POD))["authenticated"]


@pytest.mark.parametrize(("kw", "status"), [
    ({"expiration_s": 599}, 422),            # the real API server's minimum: 10 minutes
    ({"sa": "default"}, 400),                # the pod does not run as that service account
    ({"find": pods()}, 404),                 # no such pod
])
def test_token_requests_the_real_api_server_refuses_are_refused(kw: dict[str, Any], status: int) -> None:
    with pytest.raises(TokenRequestError) as err:
        request(TokenAuthority("https://a"), **kw)
    assert err.value.status == status


def test_the_expiry_of_a_token_is_what_was_asked_for() -> None:
    clock = Clock()
    auth = TokenAuthority("https://a", clock=clock)
    token = request(auth, expiration_s=1200)
    assert auth.expiry_of(token) == int(clock.now_s) + 1200
    assert claims_unverified(token)["kubernetes.io"]["pod"] == {"name": "ztunnel-node-1", "uid": "u-1"}
    assert claims_unverified("junk") == {}


@pytest.mark.parametrize(("age_s", "due"), [(0, False), (2879, False), (2880, True), (None, True)])
def test_a_projected_token_is_refreshed_at_80_percent_of_its_life(age_s: float | None, due: bool) -> None:
    issued = None if age_s is None else 1000.0
    assert token_refresh_due(1000.0 + (age_s or 0), issued, 1000.0 + 3600) is due


class FakeApi:
    def __init__(self, clock: Clock) -> None:
        self.clock, self.calls, self.fail = clock, 0, False

    def request_token(self, namespace: str, service_account: str, pod: str, audiences: list[str],
                      expiration_s: int = 3600) -> tuple[str, float]:
        self.calls += 1
        if self.fail:
            raise OSError("API server restarting")
        return f"{service_account}@{pod}#{self.calls}", self.clock() + expiration_s


def test_the_projector_writes_private_tokens_and_refreshes_them_like_a_kubelet(tmp_path: Path) -> None:
    clock = Clock()
    api = FakeApi(clock)
    vol = ProjectedVolume("ztunnel-node-1", "ztunnel", tmp_path / "p" / "sa-token")
    proj = TokenProjector(api, [vol], clock)
    assert proj.sync() == 1 and vol.path.read_text() == "ztunnel@ztunnel-node-1#1\n"
    st = os.lstat(vol.path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert proj.sync() == 0 and api.calls == 1            # fresh: nothing to do
    clock.now_s += 0.8 * 3600
    api.fail = True
    assert proj.sync() == 0 and "restarting" in proj.last_error
    assert vol.path.read_text().endswith("#1\n")          # the old token stays until a new one comes
    assert proj.sync() == 0 and api.calls == 2            # retried only after a pause
    clock.now_s += 3
    api.fail = False
    assert proj.sync() == 1 and vol.path.read_text().endswith("#3\n")


def test_a_planted_link_at_the_token_path_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    d = tmp_path / "p"
    d.mkdir(mode=0o700)
    (d / "sa-token").symlink_to(victim)
    proj = TokenProjector(FakeApi(Clock()), [ProjectedVolume("ztunnel-node-1", "ztunnel", d / "sa-token")])
    assert proj.sync() == 1
    assert victim.read_text() == "keep" and not (d / "sa-token").is_symlink()


def test_every_proxy_of_a_cluster_is_a_pod_with_its_projected_token() -> None:
    east = plan_lab(*fleet(1, 2)).clusters[0]
    objs = desired_objects(east, {}, {})
    proxy_pods = {k: v for k, v in objs.items() if k.startswith("Pod/meshfed-system/")}
    assert set(proxy_pods) == {"Pod/meshfed-system/ztunnel-node-1", "Pod/meshfed-system/ztunnel-node-2",
                               "Pod/meshfed-system/eastwest-gateway"}
    zt = proxy_pods["Pod/meshfed-system/ztunnel-node-1"]["spec"]
    assert zt["nodeName"] == "node-1" and zt["hostNetwork"] is True and zt["serviceAccountName"] == "ztunnel"
    assert proxy_pods["Pod/meshfed-system/eastwest-gateway"]["spec"]["serviceAccountName"] == "eastwest-gateway"
    assert "Namespace//meshfed-system" in objs
    vols = proxy_volumes(east, lambda pid: Path("/s") / pid.replace("/", "_") / "sa-token")
    assert [(v.pod, v.service_account, v.audience) for v in vols] == [
        ("ztunnel-node-1", "ztunnel", "meshfed-controller"), ("ztunnel-node-2", "ztunnel", "meshfed-controller"),
        ("eastwest-gateway", "eastwest-gateway", "meshfed-controller")]
