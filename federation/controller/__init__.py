"""The controller's behaviour as plain Python classes, testable without Ray.

The reconcile loop (`reconciler`), its inputs (`sources`: the Git source and the cluster agents),
certificate signing policy and CA storage (`signing`, `ca`), bootstrap credentials (`bootstrap`,
their one owner and writer), the config distributor (per-proxy desired/ACKed state), status
queries and checks, and the sqlite store. `federation.ray` hosts these classes as actors;
`federation.server` exposes them over gRPC and HTTP.
"""
