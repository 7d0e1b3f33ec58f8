"""The federation controller: follows the fleet repo, discovers every cluster, decides the mesh and
programs the data plane.

Rooms, each importing only the ones listed after it (import-linter enforces it):

  cli         the `meshfed` command; nothing imports it
  ray         the only `import ray`: thin actor wrappers around the controller's plain classes
  server      I/O adapters: gRPC services, the status HTTP API, /metrics
  controller  plain classes that own behaviour: reconcile loop, CSR signing policy, bootstrap
              credentials, status queries, checks, the sqlite store, CA storage
  core        pure decisions with `now` passed in: endpoint graph, trust graph, failover engine,
              render + deltas, events, explain, planning, rotation

From the data plane the controller imports only `ztunnel.api`, the contract both sides share.
"""
