"""The proxies: node (capture → HBONE, HBONE → pod), east-west gateway (double HBONE), and what they
share (sessions, relay, routing, capture, SOCKS5, admin/metrics). Pure decisions in `plan` and
`routing`; sockets in `relay` and the proxies.
"""
