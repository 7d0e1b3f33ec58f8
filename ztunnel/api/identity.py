"""SPIFFE identities of meshfed workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

One typed id, `SpiffeId`, with a strict `parse` and a `str` that round-trips exactly
(`str(SpiffeId.parse(s)) == s` for every accepted `s`). Strict on purpose: an identity is compared
as a string by authorization policies and by the verifier, so two spellings of "the same" identity
must never both be accepted. In particular:

- the trust domain must already be lowercase (py-spiffe folds case silently; we reject, because a
  policy written for `spiffe://east.mesh/...` must not match a certificate naming `East.Mesh`);
- no port, no userinfo, no percent-encoding, no query or fragment;
- the trust domain is at most 255 bytes (SPIFFE-ID spec), the whole id at most 2048 bytes;
- the path is exactly `/ns/<ns>/sa/<sa>`: the bare trust-domain id (`spiffe://td`, the "root
  path") names a trust domain, not a workload, and is never a valid SVID identity here.

Segments use the SPIFFE path alphabet (letters, digits, `.`, `-`, `_`), are non-empty and are
never `.` or `..`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SPIFFE_SCHEME = "spiffe"
MAX_TRUST_DOMAIN_BYTES = 255
MAX_SPIFFE_ID_BYTES = 2048

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")


class IdentityError(ValueError):
    """A string is not a valid meshfed SPIFFE ID (or trust domain); the message says why and how to fix it."""


def check_trust_domain(name: str) -> str:
    """Return `name` if it is a valid SPIFFE trust domain name, else raise `IdentityError`."""
    if not name:
        raise IdentityError("trust domain is empty; use a DNS-like name such as 'east.mesh'")
    if len(name.encode("utf-8")) > MAX_TRUST_DOMAIN_BYTES:
        raise IdentityError(
            f"trust domain {name[:40]!r}… is {len(name.encode('utf-8'))} bytes; SPIFFE allows at most "
            f"{MAX_TRUST_DOMAIN_BYTES}")
    if ":" in name:
        raise IdentityError(
            f"trust domain {name!r} contains ':'; a trust domain has no port or userinfo — drop the ':…' part")
    if "@" in name:
        raise IdentityError(f"trust domain {name!r} contains '@'; a trust domain has no userinfo")
    if name != name.lower():
        raise IdentityError(
            f"trust domain {name!r} has uppercase letters; SPIFFE trust domains are lowercase — "
            f"write {name.lower()!r} (meshfed never folds case silently)")
    if not _TRUST_DOMAIN_RE.fullmatch(name):
        raise IdentityError(
            f"trust domain {name!r} has characters outside [a-z0-9.-_]; use a DNS-like name such as 'east.mesh'")
    return name


def is_trust_domain(name: str) -> bool:
    try:
        check_trust_domain(name)
    except IdentityError:
        return False
    return True


def _check_segment(what: str, value: str, whole: str) -> None:
    if value in ("", ".", ".."):
        raise IdentityError(f"{whole!r}: {what} segment {value!r} is empty or a dot segment")
    if not _SEGMENT_RE.fullmatch(value):
        raise IdentityError(
            f"{whole!r}: {what} {value!r} has characters outside [A-Za-z0-9.-_] (no percent-encoding)")


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A workload identity. Build with `SpiffeId.parse(s)` or `SpiffeId(td, ns, sa)` (validated too)."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        whole = f"{SPIFFE_SCHEME}://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
        _check_segment("namespace", self.namespace, whole)
        _check_segment("service account", self.service_account, whole)
        if len(whole.encode("utf-8")) > MAX_SPIFFE_ID_BYTES:
            raise IdentityError(f"SPIFFE ID is longer than {MAX_SPIFFE_ID_BYTES} bytes")

    @classmethod
    def parse(cls, s: str) -> SpiffeId:
        """Parse `spiffe://<td>/ns/<ns>/sa/<sa>` strictly (see the module docstring)."""
        if not isinstance(s, str):
            raise IdentityError(f"SPIFFE ID must be a string, got {type(s).__name__}")
        if len(s.encode("utf-8")) > MAX_SPIFFE_ID_BYTES:
            raise IdentityError(f"SPIFFE ID is longer than {MAX_SPIFFE_ID_BYTES} bytes")
        prefix = f"{SPIFFE_SCHEME}://"
        if not s.startswith(prefix):
            scheme = s.split(":", 1)[0] if ":" in s else ""
            if scheme.lower() == SPIFFE_SCHEME:
                raise IdentityError(f"{s!r}: the scheme must be lowercase 'spiffe://'")
            raise IdentityError(
                f"{s!r} is not a SPIFFE ID: expected 'spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>'")
        rest = s[len(prefix):]
        for bad, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
            if bad in rest:
                raise IdentityError(f"{s!r}: a SPIFFE ID has no {what}")
        td, slash, path = rest.partition("/")
        check_trust_domain(td)
        if not slash or not path:
            raise IdentityError(
                f"{s!r} names the trust domain itself (root path), not a workload; "
                "a workload identity is 'spiffe://<td>/ns/<namespace>/sa/<service-account>'")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise IdentityError(
                f"{s!r}: the path must be '/ns/<namespace>/sa/<service-account>' (Istio/meshfed convention), "
                f"got '/{path}'")
        return cls(td, parts[1], parts[3])

    def __str__(self) -> str:
        return f"{SPIFFE_SCHEME}://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def trust_domain_id(self) -> str:
        """`spiffe://<td>`: the id of the trust domain itself."""
        return f"{SPIFFE_SCHEME}://{self.trust_domain}"


# --- the identities of the control plane -------------------------------------------------------

PROXY_NAMESPACE = "meshfed-system"            # where proxies' own identities live
# The Kubernetes service accounts the proxies run as (the DaemonSet's and the gateway Deployment's),
# in PROXY_NAMESPACE: a projected token of one of them is what a proxy bootstraps with, and the
# gateway's is also the identity it presents on HBONE (`gateway_spiffe_id`).
NODE_PROXY_SERVICE_ACCOUNT = "ztunnel"
GATEWAY_SERVICE_ACCOUNT = "eastwest-gateway"
CONTROLLER_SERVICE_ACCOUNT = "meshfed-controller"
# The audience of a proxy's projected ServiceAccount token (the pod spec's serviceAccountToken
# `audience`): the controller's TokenReview asks for it, so a token minted for anything else (the
# API server's default audience, another service) does not bootstrap a proxy.
CONTROLLER_TOKEN_AUDIENCE = "meshfed-controller"
# The controller serves one certificate per trust domain: `controller_spiffe_id(td)`, plus the DNS
# name `controller_tls_name(td)` that a proxy of that trust domain sends as SNI to get it (gRPC
# picks the certificate by SNI). The proxy then verifies the SPIFFE ID against its own trust
# domain's bundle; the DNS name selects, it does not authenticate (an organisation's PKI may
# well issue that name to anyone).
CONTROLLER_TLS_NAME = "meshfed-controller.meshfed-system"


def controller_spiffe_id(trust_domain: str) -> str:
    """The controller's identity in `trust_domain`, the one proxies of that domain pin."""
    return str(SpiffeId(trust_domain, PROXY_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT))


def controller_tls_name(trust_domain: str) -> str:
    """The TLS server name (SNI, DNS SAN) of the controller's certificate for `trust_domain`."""
    return f"{CONTROLLER_TLS_NAME}.{check_trust_domain(trust_domain)}"


def gateway_spiffe_id(trust_domain: str) -> str:
    """The identity an east-west gateway presents on HBONE, and what a client verifies the outer
    tunnel against: `spiffe://<td>/ns/meshfed-system/sa/eastwest-gateway`."""
    return str(SpiffeId(trust_domain, PROXY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT))


# --- proxy ids ----------------------------------------------------------------------------------
#
# A proxy id names one proxy of the fleet: `ztunnel/<cluster>/<node>` (a node proxy),
# `gateway/<cluster>` (a cluster's east-west gateway), `waypoint/<cluster>/<namespace>/<name>` and
# `ingress/<cluster>/<namespace>/<name>` (the L7 proxies of a Gateway). It is what a CSR is entitled
# by, what a bootstrap token is scoped to, what a ServiceAccount token's node claim is checked
# against and what status reports, so it has one strict parser (`ProxyId.parse`) used by every place
# that builds or reads one: two spellings must never name the same proxy, and one id must never be
# read as two different proxies by two readers (a loose `split("/")` here and `rsplit` there did
# exactly that: `ztunnel/east/a/b` was node `a` to one and `b` to another).
#
# The cluster and a namespace are DNS labels (the fleet validates them as such); a node and a
# Gateway's name are Kubernetes object names (DNS subdomains: lowercase labels joined by dots).
# Because the cluster and the namespace have no dot, the proxy's SPIFFE service account
# (`ztunnel.<cluster>.<node>`, `gateway.<cluster>`, `waypoint.<cluster>.<ns>.<name>`) is injective
# too: `ztunnel/a/b.c` and a would-be `ztunnel/a.b/c` cannot both exist.

_DNS_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN_MAX = 253
PROXY_ID_SHAPES = {
    "ztunnel": "ztunnel/<cluster>/<node>",
    "gateway": "gateway/<cluster>",
    "waypoint": "waypoint/<cluster>/<namespace>/<name>",
    "ingress": "ingress/<cluster>/<namespace>/<name>",
}
_PROXY_ID_PARTS = {"ztunnel": 3, "gateway": 2, "waypoint": 4, "ingress": 4}
PROXY_ID_USAGE = (f"a proxy id is one of {', '.join(PROXY_ID_SHAPES.values())}, with <cluster> and <namespace> "
                  "DNS labels and <node>/<name> Kubernetes names (lowercase)")


def _is_dns_subdomain(name: str) -> bool:
    return 0 < len(name) <= _DNS_SUBDOMAIN_MAX and all(_DNS_LABEL_RE.fullmatch(p) for p in name.split("."))


@dataclass(frozen=True, slots=True, order=True)
class ProxyId:
    """One proxy: `ProxyId.parse("ztunnel/east/node-1")` or `ProxyId.node_proxy("east", "node-1")`.
    `str()` round-trips exactly; construction validates (IdentityError, a ValueError, naming the
    accepted shapes)."""

    kind: str            # "ztunnel" | "gateway" | "waypoint" | "ingress"
    cluster: str         # DNS label
    node: str = ""       # the node a node proxy runs on; "" otherwise
    namespace: str = ""  # a waypoint's or ingress's Gateway namespace; "" otherwise
    name: str = ""       # that Gateway's name; "" otherwise

    def __post_init__(self) -> None:
        shown = "/".join(p for p in (self.kind, self.cluster, self.node, self.namespace, self.name) if p)
        if self.kind not in _PROXY_ID_PARTS:
            raise IdentityError(f"proxy id {shown!r}: unknown kind {self.kind!r}; {PROXY_ID_USAGE}")
        if not _DNS_LABEL_RE.fullmatch(self.cluster):
            raise IdentityError(f"proxy id {shown!r}: cluster {self.cluster!r} is not a DNS label; {PROXY_ID_USAGE}")
        l7 = self.kind in ("waypoint", "ingress")
        if (self.kind == "ztunnel") != bool(self.node):
            raise IdentityError(f"proxy id {shown!r}: only a node proxy names a node; {PROXY_ID_USAGE}")
        if self.node and not _is_dns_subdomain(self.node):
            raise IdentityError(f"proxy id {shown!r}: node {self.node!r} is not a Kubernetes node name; {PROXY_ID_USAGE}")
        if l7 != bool(self.namespace) or l7 != bool(self.name):
            raise IdentityError(f"proxy id {shown!r}: only a waypoint or ingress names a namespace and a name; "
                                f"{PROXY_ID_USAGE}")
        if self.namespace and not _DNS_LABEL_RE.fullmatch(self.namespace):
            raise IdentityError(f"proxy id {shown!r}: namespace {self.namespace!r} is not a DNS label; {PROXY_ID_USAGE}")
        if self.name and not _is_dns_subdomain(self.name):
            raise IdentityError(f"proxy id {shown!r}: name {self.name!r} is not a Kubernetes name; {PROXY_ID_USAGE}")

    @classmethod
    def node_proxy(cls, cluster: str, node: str) -> ProxyId:
        return cls("ztunnel", cluster, node)

    @classmethod
    def gateway(cls, cluster: str) -> ProxyId:
        return cls("gateway", cluster)

    @classmethod
    def parse(cls, s: str) -> ProxyId:
        """The proxy `s` names, or IdentityError: exactly the parts its kind has, nothing else."""
        if not isinstance(s, str):
            raise IdentityError(f"proxy id must be a string, got {type(s).__name__}")
        parts = s.split("/")
        if parts[0] not in _PROXY_ID_PARTS or len(parts) != _PROXY_ID_PARTS[parts[0]]:
            raise IdentityError(f"proxy id {s[:80]!r} is malformed; {PROXY_ID_USAGE}")
        if parts[0] == "ztunnel":
            return cls(parts[0], parts[1], node=parts[2])
        if parts[0] == "gateway":
            return cls(parts[0], parts[1])
        return cls(parts[0], parts[1], namespace=parts[2], name=parts[3])

    def __str__(self) -> str:
        return "/".join(p for p in (self.kind, self.cluster, self.node, self.namespace, self.name) if p)

    @property
    def is_node(self) -> bool:
        return self.kind == "ztunnel"

    @property
    def service_account(self) -> str:
        """The Kubernetes service account the proxy's pod runs as (in `service_account_namespace`):
        the DaemonSet's, the east-west gateway's, or (as Istio's gateway controller deploys them) the
        Gateway's name for a waypoint and `<name>-istio` for an ingress gateway."""
        if self.kind == "ztunnel":
            return NODE_PROXY_SERVICE_ACCOUNT
        if self.kind == "gateway":
            return GATEWAY_SERVICE_ACCOUNT
        return self.name if self.kind == "waypoint" else f"{self.name}-istio"

    @property
    def service_account_namespace(self) -> str:
        return self.namespace or PROXY_NAMESPACE

    def spiffe_id(self, trust_domain: str) -> str:
        """The identity the proxy presents to the controller (see `proxy_spiffe_id`)."""
        return str(SpiffeId(trust_domain, PROXY_NAMESPACE, str(self).replace("/", ".")))


def parse_proxy_id(proxy_id: str) -> tuple[str, str]:
    """(kind, cluster) of a proxy id (`ProxyId.parse`); ValueError naming the accepted shapes."""
    pid = ProxyId.parse(proxy_id)
    return pid.kind, pid.cluster


def proxy_service_account(proxy_id: str) -> str:
    """The service account a proxy's pod runs as; ValueError (IdentityError) for anything
    `ProxyId.parse` refuses."""
    return ProxyId.parse(proxy_id).service_account


def proxy_spiffe_id(trust_domain: str, proxy_id: str) -> str:
    """The identity a proxy presents to the controller; it names the proxy, so a proxy can
    subscribe as itself only: `ztunnel/east/node-1` in east.mesh.local ->
    `spiffe://east.mesh.local/ns/meshfed-system/sa/ztunnel.east.node-1` (injective: see ProxyId)."""
    return ProxyId.parse(proxy_id).spiffe_id(trust_domain)


# --- keys and certificate requests ---------------------------------------------------------------


class KeyAndCsr(NamedTuple):
    key_pem: bytes  # PKCS#8, unencrypted: stays in this process
    csr_pem: bytes


def generate_key_and_csr(identity: SpiffeId | str) -> KeyAndCsr:
    """A fresh ECDSA P-256 key and a CSR carrying exactly one URI SAN, the identity."""
    sid = identity if isinstance(identity, SpiffeId) else SpiffeId.parse(identity)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(sid))]), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return KeyAndCsr(key_pem, csr.public_bytes(serialization.Encoding.PEM))
