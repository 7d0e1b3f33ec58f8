"""The controller's behaviour as plain Python classes, testable without Ray.

- `reconciler` (the reconcile loop's steps) driven by `reconcile_service` (its thread, the delta
  outbox to the config service, the queries it answers);
- its inputs: `sources` (the Git source, one agent per cluster) and `git_feed` (following the
  branch, fallback after a restart on a bad head);
- `config_service`, the state owner: the `store` (sqlite), the CAs (`ca`) behind the signing
  policy (`signing`: CSR entitlement, who may act as which proxy), bootstrap credentials
  (`bootstrap`, their one owner and writer), and the `distributor` (per-proxy desired/ACKed
  state, versions);
- `shard`: the push half of the config service partitioned by proxy (`shard_of`, the one
  partition decision; `ConfigShard`), fed by `reconcile_service.ShardedOutbox`;
- `queries` (status document, services, endpoints, explain, trust view) and `checks`;
- `wire`: every encoding used between the parts when they run as separate actors.

`federation.ray` hosts these classes as actors; `federation.server` exposes them over gRPC and HTTP.
"""
