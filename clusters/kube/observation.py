"""ClusterObservation: what discovery saw in one cluster's Kubernetes API, at one moment.

The contract between cluster providers/discovery (clusters/) and the federation core
(federation/): the same type whether the cluster is kind, a real cluster, or a lab cluster served
by the emulated API server, and whether it was built from a watch or offline from a LabCluster.

Plain frozen data; no Kubernetes client types leak through. Endpoints carry everything the core
needs to place them (node, zone, service account) so the core never joins Pods itself.

Invariants:
- `complete=True` means this is a full listing (a fresh LIST, or the offline lab model): the core
  may prune anything not in it and may lift fencing after a partition. A partial observation
  (`complete=False`) only upserts what it names.
- endpoint keys (`EndpointInfo.key`) are unique within an observation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Where meshfed's own objects live in a member cluster (clusters.kind.manifests installs them; the
# lab's kubelet writes the same): never enrolled, read by discovery for the gateway's address.
MESH_NAMESPACE = "meshfed-system"
GATEWAY_SERVICE = "eastwest-gateway"   # type LoadBalancer, port 15008; also the gateway's service account


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    address: str          # InternalIP: where this node's ztunnel listens for HBONE (:15008)
    region: str = ""      # topology.kubernetes.io/region
    zone: str = ""        # topology.kubernetes.io/zone
    ready: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServicePortInfo:
    name: str
    port: int
    target_port: int
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    namespace: str
    name: str
    cluster_ip: str = ""
    ports: tuple[ServicePortInfo, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One ready-or-not backend address of a Service (from an EndpointSlice + its Pod)."""

    namespace: str
    service: str
    pod: str
    address: str
    node: str
    service_account: str
    ports: tuple[ServicePortInfo, ...] = ()
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zone: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.namespace, self.service, self.pod)


@dataclass(frozen=True, slots=True)
class ClusterObservation:
    cluster: str
    observed_at_s: float          # the observer's clock, seconds (wall clock for leases)
    complete: bool
    nodes: tuple[NodeInfo, ...] = ()
    services: tuple[ServiceInfo, ...] = ()
    endpoints: tuple[EndpointInfo, ...] = ()
    resource_version: str = ""    # opaque; for logs
    removed_endpoints: tuple[tuple[str, str, str], ...] = ()  # partial observations only
    # The east-west gateway Service's load-balancer address (status.loadBalancer.ingress[0].ip or
    # .hostname), "" while it has none: where a Cluster without eastWestGateway.address is reached.
    gateway_address: str = ""
