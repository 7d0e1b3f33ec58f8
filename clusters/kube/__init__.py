"""Kubernetes discovery: the real `kubernetes` client (list + watch, leases) turning a cluster's
objects into a `ClusterObservation`, the contract the controller consumes.
"""
