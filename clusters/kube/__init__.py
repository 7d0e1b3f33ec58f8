"""The one doorway to the `kubernetes` package: discovery (list + watch, leases) turning a cluster's
objects into a `ClusterObservation`, the contract the controller consumes; and TokenReview (`auth`),
how the controller checks a proxy's ServiceAccount token against the proxy's own cluster.
"""
