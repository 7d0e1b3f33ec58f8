"""The data plane: node proxies (ztunnel), east-west gateways, and their shared machinery.

  api       the contract with the controller (config types, codec, protobuf, identities, ports) and
            the pure decision rules both sides must agree on: authorization, outlier ejection,
            priority load, trust-domain-bound verification. The only part the controller imports.
  hbone     sans-IO HTTP/2 CONNECT framer
  identity  certificate manager and TLS adapters
  xds       control-plane client, config state, persisted last good config
  proxy     node and gateway proxies, the L7 proxy (waypoint, ingress gateway) and its engine (l7),
            relay, routing, capture, SOCKS5, admin
"""
