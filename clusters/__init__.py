"""Cluster providers and the discovery contract.

  kube  the one doorway to `kubernetes`: discovery (list/watch, leases) and `ClusterObservation`
  lab   the network-namespace lab: topology plan + execution, supervision, faults, emulated API
  kind  kind clusters (Docker)
"""
