"""TokenReview: ask a cluster's API server whether a ServiceAccount token is one it issued.

How a proxy proves who it is on its first certificate request, as istiod does it: the proxy sends
its pod's projected ServiceAccount token (audience-bound, expiring, bound to the pod), and the
controller asks *that proxy's own cluster* whether the token is valid (`POST
/apis/authentication.k8s.io/v1/tokenreviews`). The API server answers with the authenticated user
(`system:serviceaccount:<namespace>:<name>`) and, for a pod-bound token, the pod and node it was
issued for (`status.user.extra["authentication.kubernetes.io/pod-name" | "node-name"]`; node
claims exist since Kubernetes 1.30, GA in 1.32). What to make of the answer is decided elsewhere
(`federation.controller.signing.check_service_account`); this module only asks.

Part of `clusters.kube`, the one doorway to the `kubernetes` package (its client from a kubeconfig
context, as discovery uses: `clusters.kube.discovery._api_client`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clusters.kube.discovery import DiscoveryError, api_client

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
MAX_TOKEN_CHARS = 16 * 1024


@dataclass(frozen=True, slots=True)
class TokenReviewResult:
    """`status` of a TokenReview, as plain data."""

    authenticated: bool
    username: str = ""
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    error: str = ""

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> TokenReviewResult:
        user = status.get("user") or {}
        extra = {str(k): tuple(str(x) for x in (v or ())) for k, v in dict(user.get("extra") or {}).items()}
        return cls(bool(status.get("authenticated")), str(user.get("username") or ""), str(user.get("uid") or ""),
                   tuple(str(g) for g in user.get("groups") or ()), extra,
                   tuple(str(a) for a in status.get("audiences") or ()), str(status.get("error") or ""))


class TokenReviewer:
    """TokenReviews against one cluster's API server (a kubeconfig context). Thread-safe for
    callers (the client is created once; each review is one request)."""

    def __init__(self, cluster: str, kubeconfig: str | None, context: str, request_timeout_s: float = 5.0) -> None:
        self.cluster, self.kubeconfig, self.context = cluster, kubeconfig, context
        self.request_timeout_s = request_timeout_s
        self._api: Any = None
        self.reviews = 0

    def review(self, token: str, audiences: Sequence[str]) -> TokenReviewResult:
        """The API server's verdict on `token` for `audiences`. Raises `DiscoveryError` when the API
        server cannot be asked (unreachable, or it refused the review itself)."""
        from kubernetes import client

        if not token or len(token) > MAX_TOKEN_CHARS:
            return TokenReviewResult(False, error=f"token is empty or longer than {MAX_TOKEN_CHARS} characters")
        if self._api is None:
            self._api = api_client(self.kubeconfig, self.context)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": list(audiences)}}
        try:
            resp = client.AuthenticationV1Api(self._api).create_token_review(
                body=body, _preload_content=False, _request_timeout=self.request_timeout_s)
            doc = json.loads(resp.data)
        except Exception as e:  # the client raises ApiException, urllib3 errors, ...
            raise DiscoveryError(f"cluster {self.cluster}: TokenReview through context {self.context!r} failed: "
                                 f"{e}; is the API server reachable, and may the controller create tokenreviews "
                                 f"(RBAC: system:auth-delegator)?") from e
        self.reviews += 1
        return TokenReviewResult.from_status(doc.get("status") or {})
