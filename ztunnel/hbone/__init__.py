"""HBONE: HTTP/2 CONNECT tunnels, as a sans-IO framer (`framer.HboneConnection`): bytes in, events
and bytes out; sockets live in `ztunnel.proxy.relay`.
"""
