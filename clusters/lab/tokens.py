"""ServiceAccount tokens for the emulated API server: TokenRequest mints them, TokenReview checks them.

The lab plays Kubernetes for the controller, and a proxy's first certificate on Kubernetes is
bought with its pod's projected ServiceAccount token, which the controller has the proxy's own
cluster review (`clusters.kube.auth`). So each emulated API server answers, as a real one does:

- `POST /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token` (TokenRequest): a token for `sa`,
  for the requested audiences, expiring after `expirationSeconds` (at least 10 min, as the real
  API server insists), bound to the pod named in `boundObjectRef`, which must exist, run as `sa`
  and, if scheduled, carry its node into the token (the kubelet asks for each pod's projected
  volume, as the lab does: `clusters.lab.kubelet.TokenProjector`);
- `POST /apis/authentication.k8s.io/v1/tokenreviews` (TokenReview): authenticated only for a token
  this server signed, not expired, for one of the audiences asked about (or, when none are, this
  server's own), whose bound pod still exists with the same uid; the answer carries the user
  `system:serviceaccount:<ns>:<sa>` and the pod and node claims in `user.extra`
  (`authentication.kubernetes.io/pod-name`, `pod-uid`, `node-name`), as Kubernetes >= 1.30 does.

Tokens are JWTs signed with HMAC-SHA256 under a random key per server (`TokenAuthority`): a token
of another lab cluster's API server does not verify here, as it would not on a real one. Pure:
the clock is injected and the pod lookup is the caller's (`apiserver` asks its own store).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MIN_EXPIRATION_S = 600            # what the real API server requires of a TokenRequest
DEFAULT_EXPIRATION_S = 3600
MAX_EXPIRATION_S = 48 * 3600
DEFAULT_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
MAX_TOKEN_CHARS = 16 * 1024
TOKEN_REQUEST_PATH = re.compile(r"/api/v1/namespaces/([a-z0-9][a-z0-9.-]{0,252})/serviceaccounts/"
                                r"([a-z0-9][a-z0-9.-]{0,252})/token")
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

PodLookup = Callable[[str, str], Mapping[str, Any] | None]   # (namespace, name) -> the Pod object or None


class TokenRequestError(ValueError):
    """A TokenRequest the API server refuses; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_JWT_HEADER = _b64(b'{"alg":"HS256","typ":"JWT"}')


class TokenAuthority:
    """Mints and reviews one API server's ServiceAccount tokens. Invariants: `key` never leaves
    this object; a token verifies only under the key that signed it."""

    def __init__(self, issuer: str, key: bytes | None = None, clock: Callable[[], float] = time.time) -> None:
        self.issuer = issuer
        self._key = key or secrets.token_bytes(32)
        self.clock = clock
        self.minted = 0
        self.reviewed = 0

    def __repr__(self) -> str:
        return f"TokenAuthority({self.issuer!r})"

    def expiry_of(self, token: str) -> float:
        """When a token this authority minted expires (what the TokenRequest status says)."""
        return float(claims_unverified(token).get("exp") or 0.0)

    def _sign(self, signing_input: bytes) -> bytes:
        return hmac.new(self._key, signing_input, hashlib.sha256).digest()

    def _uid(self, *parts: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join((self.issuer, *parts))))

    # --- TokenRequest ---------------------------------------------------------------------------

    def token_request(self, namespace: str, service_account: str, body: Mapping[str, Any],
                      find_pod: PodLookup) -> dict[str, Any]:
        """The TokenRequest answer (the object with `status.token`); TokenRequestError if refused."""
        spec = body.get("spec") or {}
        audiences = [str(a) for a in spec.get("audiences") or [DEFAULT_AUDIENCE]]
        try:
            expiration_s = int(spec.get("expirationSeconds") or DEFAULT_EXPIRATION_S)
        except (TypeError, ValueError):
            raise TokenRequestError("spec.expirationSeconds must be an integer") from None
        if expiration_s < MIN_EXPIRATION_S:
            raise TokenRequestError(f"spec.expirationSeconds: may not specify a duration less than "
                                    f"{MIN_EXPIRATION_S // 60} minutes", 422)
        expiration_s = min(expiration_s, MAX_EXPIRATION_S)
        pod: Mapping[str, Any] | None = None
        ref = spec.get("boundObjectRef")
        if ref:
            if ref.get("kind") != "Pod":
                raise TokenRequestError(f"boundObjectRef kind {ref.get('kind')!r}: this API server binds tokens "
                                        "to Pods only", 422)
            pod = find_pod(namespace, str(ref.get("name") or ""))
            if pod is None:
                raise TokenRequestError(f"pods \"{ref.get('name')}\" not found", 404)
            pod_uid = str((pod.get("metadata") or {}).get("uid") or "")
            if ref.get("uid") and ref["uid"] != pod_uid:
                raise TokenRequestError(f"the UID in the bound object reference ({ref['uid']}) does not match the "
                                        f"UID in record ({pod_uid}); the object might have been deleted and recreated",
                                        409)
            runs_as = str((pod.get("spec") or {}).get("serviceAccountName") or "default")
            if runs_as != service_account:
                raise TokenRequestError(f"pod {ref.get('name')} runs as service account {runs_as!r}, not "
                                        f"{service_account!r}", 400)
        token, expires_at_s = self.mint(namespace, service_account, audiences, expiration_s, pod)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at_s))
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "metadata": {"name": service_account, "namespace": namespace},
                "spec": {"audiences": audiences, "expirationSeconds": expiration_s,
                         **({"boundObjectRef": ref} if ref else {})},
                "status": {"token": token, "expirationTimestamp": stamp}}

    def mint(self, namespace: str, service_account: str, audiences: Sequence[str], expiration_s: float,
             pod: Mapping[str, Any] | None = None) -> tuple[str, float]:
        now = self.clock()
        claims: dict[str, Any] = {
            "iss": self.issuer, "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "aud": list(audiences), "iat": int(now), "nbf": int(now), "exp": int(now + expiration_s),
            "jti": secrets.token_hex(8),
            "kubernetes.io": {"namespace": namespace,
                              "serviceaccount": {"name": service_account,
                                                 "uid": self._uid(namespace, service_account)}},
        }
        if pod is not None:
            meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
            claims["kubernetes.io"]["pod"] = {"name": str(meta.get("name") or ""), "uid": str(meta.get("uid") or "")}
            if spec.get("nodeName"):
                node = str(spec["nodeName"])
                claims["kubernetes.io"]["node"] = {"name": node, "uid": self._uid("node", node)}
        signing_input = f"{_JWT_HEADER}.{_b64(json.dumps(claims).encode())}"
        token = f"{signing_input}.{_b64(self._sign(signing_input.encode()))}"
        self.minted += 1
        return token, float(claims["exp"])

    # --- TokenReview ----------------------------------------------------------------------------

    def token_review(self, body: Mapping[str, Any], find_pod: PodLookup) -> dict[str, Any]:
        """The TokenReview answer: `status.authenticated` and, if so, the user and its claims."""
        spec = body.get("spec") or {}
        status = self.review(str(spec.get("token") or ""), [str(a) for a in spec.get("audiences") or []], find_pod)
        self.reviewed += 1
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "metadata": {"creationTimestamp": None}, "spec": dict(spec, token="<redacted>"), "status": status}

    def review(self, token: str, audiences: Sequence[str], find_pod: PodLookup) -> dict[str, Any]:
        def refuse(why: str) -> dict[str, Any]:
            return {"authenticated": False, "error": why, "user": {}}

        parts = token.split(".")
        if len(token) > MAX_TOKEN_CHARS or len(parts) != 3:
            return refuse("not a JWT this API server issued")
        try:
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
            signature = _unb64(parts[2])
        except ValueError:
            return refuse("not a JWT this API server issued")
        if header.get("alg") != "HS256" or not hmac.compare_digest(signature, self._sign(f"{parts[0]}.{parts[1]}".encode())):
            return refuse("invalid signature: not issued by this API server")
        if not isinstance(claims, dict) or claims.get("iss") != self.issuer:
            return refuse("the token's issuer is not this API server")
        now = self.clock()
        try:
            nbf, exp = float(claims["nbf"]), float(claims["exp"])
        except (KeyError, TypeError, ValueError):
            return refuse("the token has no validity period")
        if now < nbf:
            return refuse("the token is not valid yet")
        if now >= exp:
            return refuse("the token has expired")
        token_aud = [str(a) for a in claims.get("aud") or []]
        wanted = list(audiences) or [DEFAULT_AUDIENCE]
        matched = [a for a in wanted if a in token_aud]
        if not matched:
            return refuse(f"the token's audiences {token_aud} include none of {wanted}")
        k8s = claims.get("kubernetes.io") or {}
        namespace = str(k8s.get("namespace") or "")
        sa = (k8s.get("serviceaccount") or {}).get("name")
        extra: dict[str, list[str]] = {"authentication.kubernetes.io/credential-id": [f"JTI={claims.get('jti', '')}"]}
        pod = k8s.get("pod")
        if pod:
            live = find_pod(namespace, str(pod.get("name") or ""))
            if live is None or str((live.get("metadata") or {}).get("uid") or "") != str(pod.get("uid") or ""):
                return refuse(f"the pod {namespace}/{pod.get('name')} the token is bound to no longer exists")
            extra["authentication.kubernetes.io/pod-name"] = [str(pod["name"])]
            extra["authentication.kubernetes.io/pod-uid"] = [str(pod.get("uid") or "")]
            node = k8s.get("node")
            if node:
                extra["authentication.kubernetes.io/node-name"] = [str(node.get("name") or "")]
                extra["authentication.kubernetes.io/node-uid"] = [str(node.get("uid") or "")]
        return {"authenticated": True, "audiences": matched,
                "user": {"username": str(claims.get("sub") or ""),
                         "uid": str((k8s.get("serviceaccount") or {}).get("uid") or ""),
                         "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                    "system:authenticated"] if sa else ["system:authenticated"],
                         "extra": extra}}


def claims_unverified(token: str) -> dict[str, Any]:
    """The claims of a JWT *without* checking its signature: only to know which pod to look up
    before `TokenAuthority.review` verifies it. Never trust what this returns."""
    parts = token.split(".")
    if len(token) > MAX_TOKEN_CHARS or len(parts) != 3:
        return {}
    try:
        claims = json.loads(_unb64(parts[1]))
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}
