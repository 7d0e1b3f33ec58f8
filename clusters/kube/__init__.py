"""The one doorway to `kubernetes`: discovery (list + watch, leases) turning a cluster's objects
into a `ClusterObservation`, the contract the controller consumes (`discovery`, `observation`),
and applying rendered objects to a cluster (`apply`, for `meshfed install` and the kind provider).
"""
