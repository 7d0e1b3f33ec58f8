"""The well-known ports of the data plane (Istio ambient's numbers), one definition for all rooms.

The fleet schema (`gitops`, which imports nothing of ours) repeats the HBONE port as the default
east-west gateway port; `tests/unit/test_layout.py` pins the two equal.
"""

from __future__ import annotations

HBONE_PORT = 15008             # mTLS HTTP/2 CONNECT tunnels: node ztunnels and east-west gateways
OUTBOUND_CAPTURE_PORT = 15001  # where a node ztunnel accepts pod traffic redirected by iptables
SOCKS5_PORT = 15080            # explicit outbound for workloads that cannot be captured
ADMIN_PORT = 15021             # /ready, /config_dump, /metrics (loopback of the proxy's namespace)
DNS_CAPTURE_PORT = 15053       # a node ztunnel's DNS responder: pods' udp/tcp 53, redirected by iptables
DNS_PORT = 53                  # what pods send DNS to (their resolv.conf nameserver), captured
