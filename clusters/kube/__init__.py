"""The one doorway to `kubernetes`: discovery (list + watch, leases) turning a cluster's objects
into a `ClusterObservation`, the contract the controller consumes (`discovery`, `observation`),
applying rendered objects to a cluster (`apply`, for `meshfed install` and the kind provider), and
TokenReview (`auth`), how the controller checks a proxy's ServiceAccount token against the proxy's
own cluster.
"""
