"""What a proxy process loads: the L7 stack only where HTTP is parsed.

Idle RSS is a target of the data-plane benchmark (`python -m benchmarks.dataplane`, "rss"); the L7
imports (h2, httptools, the waypoint) cost a node proxy ~2.7 MB of it. A fresh interpreter, since
this test process has imported everything already.
"""

from __future__ import annotations

import subprocess
import sys

from ztunnel.api.config import ProxyMode

_L7_MODULES = ("ztunnel.proxy.waypoint", "ztunnel.proxy.l7.h2c", "h2.connection", "httptools")


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=60)
    return set(out.stdout.split())


def test_a_node_proxy_or_gateway_process_does_not_import_the_l7_stack() -> None:
    loaded = _loaded_after("import ztunnel.__main__ as m\n"
                           "from ztunnel.api.config import ProxyMode\n"
                           "m.proxy_class(ProxyMode.NODE); m.proxy_class(ProxyMode.GATEWAY)")
    assert "ztunnel.proxy.node" in loaded and "ztunnel.proxy.gateway" in loaded
    assert not loaded & set(_L7_MODULES), sorted(loaded & set(_L7_MODULES))


def test_waypoints_and_ingress_gateways_get_the_l7_proxy() -> None:
    from ztunnel.__main__ import proxy_class
    from ztunnel.proxy.gateway import GatewayProxy
    from ztunnel.proxy.node import NodeProxy
    from ztunnel.proxy.waypoint import L7Proxy

    assert proxy_class(ProxyMode.WAYPOINT) is L7Proxy
    assert proxy_class(ProxyMode.INGRESS) is L7Proxy
    assert proxy_class(ProxyMode.GATEWAY) is GatewayProxy
    assert proxy_class(ProxyMode.NODE) is NodeProxy
