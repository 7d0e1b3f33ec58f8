"""The proxies: node (capture → HBONE, HBONE → pod), east-west gateway (double HBONE), the L7 proxy
(`waypoint`: a waypoint, HBONE in; or an ingress gateway, HTTP in), and what they share (sessions,
relay, routing, capture, SOCKS5, admin/metrics). Pure decisions in `plan`, `routing` and the `l7`
engine; sockets in `relay` and the proxies.
"""
