"""The federation graph as inline SVG for the console, laid out here (no graph library, no JS).

Input: `federation.core.graph_view.graph_data` (the same data `meshfed graph` exports). A
deterministic layout small fleets read at a glance:

  - one box per network, side by side, its clusters in a row inside it; a cluster box shows its
    name, region/zone, trust domain, lease state and its east-west gateway;
  - trust edges as arcs above the clusters (grey when mutual, red dashed when one-sided);
  - global services as ellipses in rows below, an edge to every cluster that has endpoints of it,
    coloured by `EdgeHealth` and labelled healthy/total;
  - failovers as purple arrows below the clusters, from the client cluster to each cluster that
    took part of its traffic, labelled with the service.

Every element carries `data-*` attributes (cluster, service, health, lease) so the browser test
and a curious operator's devtools can read the picture; every text goes through `html.h`.
Colours live in console.css (classes), so the SVG has no style attributes (the CSP allows none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from federation.server.html import Html, h

MARGIN = 20
TOP = 50                 # room for the trust arcs above the clusters
CLUSTER_W, CLUSTER_H = 200, 104
CLUSTER_GAP, NETWORK_GAP, NETWORK_PAD, NETWORK_HEAD = 24, 36, 12, 22
FAILOVER_ROOM = 120      # between the clusters and the services: the failover arrows
SERVICE_W, SERVICE_H, SERVICE_ROW_H = 230, 40, 70


def short_service(hostname: str) -> str:
    """`checkout.shop.svc.clusterset.local` → `checkout.shop` (the full name is in the tooltip)."""
    parts = hostname.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else hostname


def layout_clusters(data: Mapping[str, Any]) -> tuple[dict[str, tuple[float, float]], list[dict[str, Any]], float]:
    """(cluster -> top-left corner, network boxes, total width)."""
    clusters = {c["name"]: c for c in data.get("clusters", [])}
    networks: dict[str, list[str]] = {n: sorted(m for m in ms if m in clusters)
                                      for n, ms in (data.get("networks") or {}).items()}
    placed = {m for ms in networks.values() for m in ms}
    for name in sorted(set(clusters) - placed):   # a cluster the networks map does not list
        networks.setdefault(clusters[name].get("network") or "?", []).append(name)
    pos: dict[str, tuple[float, float]] = {}
    boxes: list[dict[str, Any]] = []
    x = float(MARGIN)
    y = float(TOP + NETWORK_HEAD + NETWORK_PAD)
    for net in sorted(networks):
        members = networks[net]
        if not members:
            continue
        width = 2 * NETWORK_PAD + len(members) * CLUSTER_W + (len(members) - 1) * CLUSTER_GAP
        boxes.append({"network": net, "x": x, "y": float(TOP), "w": float(width),
                      "h": float(NETWORK_HEAD + 2 * NETWORK_PAD + CLUSTER_H)})
        for i, name in enumerate(members):
            pos[name] = (x + NETWORK_PAD + i * (CLUSTER_W + CLUSTER_GAP), y)
        x += width + NETWORK_GAP
    return pos, boxes, max(x - NETWORK_GAP + MARGIN, 2 * MARGIN + SERVICE_W)


def graph_svg(data: Mapping[str, Any]) -> Html:
    pos, boxes, width = layout_clusters(data)
    clusters = {c["name"]: c for c in data.get("clusters", [])}
    services: Sequence[Mapping[str, Any]] = data.get("services", [])
    cluster_bottom = TOP + NETWORK_HEAD + NETWORK_PAD + CLUSTER_H
    services_top = cluster_bottom + NETWORK_PAD + FAILOVER_ROOM
    per_row = max(1, int((width - 2 * MARGIN) // (SERVICE_W + 20)))
    spos: dict[str, tuple[float, float]] = {}
    for i, s in enumerate(services):
        row, col = divmod(i, per_row)
        in_row = min(per_row, len(services) - row * per_row)
        step = (width - 2 * MARGIN) / in_row
        spos[s["hostname"]] = (MARGIN + step * (col + 0.5), services_top + row * SERVICE_ROW_H + SERVICE_H / 2)
    rows = (len(services) + per_row - 1) // per_row
    height = services_top + max(rows, 1) * SERVICE_ROW_H + MARGIN

    layers = [
        _defs(),
        [_network(b) for b in boxes],
        _trust_edges(data.get("trust", []), clusters, pos),
        _service_edges(services, pos, spos),
        [_cluster(clusters[n], *pos[n]) for n in sorted(pos)],
        _failover_edges(data.get("failovers", []), pos, cluster_bottom),
        [_service(s, *spos[s["hostname"]]) for s in services],
    ]
    return h("svg", *layers, xmlns="http://www.w3.org/2000/svg", viewBox=f"0 0 {width:.0f} {height:.0f}",
             class_="graph", role="img", aria_label="federation graph",
             data_clusters=len(pos), data_revision=str(data.get("revision", ""))[:12])


def _defs() -> Html:
    markers = [h("marker", h("path", d="M0,0 L10,5 L0,10 z", class_=f"arrow-{kind}"), id=f"arrow-{kind}",
                 viewBox="0 0 10 10", refX="9", refY="5", markerWidth="7", markerHeight="7", orient="auto")
               for kind in ("failover", "healthy", "degraded", "down", "empty")]
    return h("defs", markers)


def _network(b: Mapping[str, Any]) -> Html:
    return h("g", h("rect", x=b["x"], y=b["y"], width=b["w"], height=b["h"], rx=10, class_="network-box"),
             h("text", f"network {b['network']}", x=b["x"] + 10, y=b["y"] + 16, class_="network-label"),
             class_="network", data_network=b["network"])


def _cluster(c: Mapping[str, Any], x: float, y: float) -> Html:
    lease = str(c.get("lease") or "")
    gw = c.get("gateway")
    title = (f"cluster {c['name']} — network {c.get('network')}, {c.get('region')}/{c.get('zone')}, trust domain "
             f"{c.get('trust_domain')}, {len(c.get('nodes') or [])} nodes, lease {lease}, "
             + (f"east-west gateway {gw}" if gw else "no east-west gateway"))
    return h(
        "g",
        h("title", title),
        h("rect", x=x, y=y, width=CLUSTER_W, height=CLUSTER_H, rx=8, class_="cluster-box"),
        h("text", c["name"], x=x + 10, y=y + 20, class_="cluster-name"),
        h("text", f"lease {lease}", x=x + CLUSTER_W - 10, y=y + 20, class_=f"lease lease-{lease.lower()}",
          text_anchor="end"),
        h("text", f"{c.get('region')}/{c.get('zone')} · {len(c.get('nodes') or [])} nodes", x=x + 10, y=y + 40,
          class_="cluster-detail"),
        h("text", f"trust {c.get('trust_domain')}", x=x + 10, y=y + 58, class_="cluster-detail trust-domain"),
        h("g",
          h("rect", x=x + 8, y=y + CLUSTER_H - 32, width=CLUSTER_W - 16, height=24, rx=5,
            class_="gateway-box" if gw else "gateway-box none"),
          h("text", f"gateway {gw}" if gw else "no east-west gateway", x=x + 16, y=y + CLUSTER_H - 15,
            class_="gateway-label"),
          class_="gateway", data_gateway=gw or ""),
        class_=f"cluster lease-{lease.lower()}", data_cluster=c["name"], data_lease=lease,
        data_network=c.get("network") or "", data_trust_domain=c.get("trust_domain") or "")


def _center_top(p: tuple[float, float]) -> tuple[float, float]:
    return p[0] + CLUSTER_W / 2, p[1]


def _trust_edges(edges: Sequence[Mapping[str, Any]], clusters: Mapping[str, Any],
                 pos: Mapping[str, tuple[float, float]]) -> list[Html]:
    by_domain: dict[str, list[str]] = {}
    for name in sorted(pos):
        by_domain.setdefault(clusters[name].get("trust_domain") or "", []).append(name)
    out = []
    for e in edges:
        for a in by_domain.get(e["from"], []):
            for b in by_domain.get(e["to"], []):
                (x1, y1), (x2, y2) = _center_top(pos[a]), _center_top(pos[b])
                lift = 24 + 0.12 * abs(x2 - x1)
                cy = min(y1, y2) - min(lift, TOP - 8)
                kind = "mutual" if e["mutual"] else "one-sided"
                title = (f"trust {e['from']} ↔ {e['to']} (mutual federation)" if e["mutual"] else
                         f"trust {e['from']} → {e['to']} is one-sided: mTLS between them fails")
                out.append(h("path", h("title", title), d=f"M{x1:.0f},{y1:.0f} Q{(x1 + x2) / 2:.0f},{cy:.0f} "
                                                           f"{x2:.0f},{y2:.0f}",
                              class_=f"edge trust {kind}", data_from=a, data_to=b))
    return out


def _service_edges(services: Sequence[Mapping[str, Any]], pos: Mapping[str, tuple[float, float]],
                   spos: Mapping[str, tuple[float, float]]) -> list[Html]:
    out = []
    n = max(len(services), 1)
    for i, s in enumerate(services):
        sx, sy = spos[s["hostname"]]
        for pc in s.get("clusters", []):
            if pc["cluster"] not in pos:
                continue
            cx, cy = pos[pc["cluster"]]
            x2 = cx + CLUSTER_W / 2 + (i - (n - 1) / 2) * min(14.0, (CLUSTER_W - 40) / n)
            y2 = cy + CLUSTER_H
            y1 = sy - SERVICE_H / 2
            total = len(pc.get("endpoints") or [])
            health = str(pc.get("health") or "empty")
            label = f"{pc.get('healthy', 0)}/{total}"
            title = (f"{s['hostname']} in {pc['cluster']}: {pc.get('healthy', 0)} of {total} endpoints healthy"
                     + (" — its gateway aggregate is ejected by clients elsewhere" if pc.get("gateway_ejected")
                        else ""))
            lx, ly = sx + (x2 - sx) * 0.72, y1 + (y2 - y1) * 0.72
            out.append(h("g",
                         h("title", title),
                         h("line", x1=f"{sx:.0f}", y1=f"{y1:.0f}", x2=f"{x2:.0f}", y2=f"{y2:.0f}",
                           class_="edge-line", marker_end=f"url(#arrow-{health})"),
                         h("text", label, x=f"{lx + 4:.0f}", y=f"{ly:.0f}", class_="edge-label"),
                         class_=f"edge service-edge {health}", data_service=s["hostname"],
                         data_cluster=pc["cluster"], data_health=health))
    return out


def _failover_edges(failovers: Sequence[Mapping[str, Any]], pos: Mapping[str, tuple[float, float]],
                    cluster_bottom: float) -> list[Html]:
    out = []
    for k, fo in enumerate(failovers):
        if fo["from"] not in pos:
            continue
        fx, _ = pos[fo["from"]]
        for to in fo.get("to", []):
            if to not in pos:
                continue
            tx, _ = pos[to]
            x1, x2 = fx + CLUSTER_W * 0.35, tx + CLUSTER_W * 0.65
            dip = cluster_bottom + 30 + min(FAILOVER_ROOM - 40, 0.1 * abs(x2 - x1) + 12 * k)
            title = (f"{fo['service']}: clients in {fo['from']} failed over to {to} — tier 0 takes "
                     f"{fo.get('tier0_share', 0) * 100:.0f}% ({fo.get('policy') or 'default policy'}"
                     f"{', ' + fo['file'] if fo.get('file') else ''})")
            out.append(h("g",
                         h("title", title),
                         h("path", d=f"M{x1:.0f},{cluster_bottom:.0f} Q{(x1 + x2) / 2:.0f},{dip + 30:.0f} "
                                     f"{x2:.0f},{cluster_bottom:.0f}",
                           class_="edge-line", marker_end="url(#arrow-failover)"),
                         h("text", f"{short_service(fo['service'])} failed over", x=f"{(x1 + x2) / 2:.0f}",
                           y=f"{dip + 10:.0f}", class_="failover-label", text_anchor="middle"),
                         class_="edge failover", data_service=fo["service"], data_from=fo["from"], data_to=to))
    return out


def _service(s: Mapping[str, Any], x: float, y: float) -> Html:
    states = [pc.get("health") for pc in s.get("clusters", [])]
    worst = next((st for st in ("down", "degraded", "healthy") if st in states), "empty")
    return h("g",
             h("title", f"{s['hostname']} — {s.get('policy') or 'default policy'}; exported from "
                        f"{', '.join(s.get('export_from') or []) or 'nowhere'}"),
             h("ellipse", cx=f"{x:.0f}", cy=f"{y:.0f}", rx=SERVICE_W / 2, ry=SERVICE_H / 2,
               class_="service-box"),
             h("text", short_service(s["hostname"]), x=f"{x:.0f}", y=f"{y + 5:.0f}", class_="service-name",
               text_anchor="middle"),
             class_=f"service {worst}", data_service=s["hostname"])


def legend() -> Html:
    items = [("healthy", "all endpoints healthy"), ("degraded", "some unhealthy or ejected"),
             ("down", "none healthy / gateway ejected"), ("empty", "no endpoints"),
             ("failover", "clients failed over"), ("trust", "trust (mutual)"), ("trust-one-sided", "trust one-sided")]
    return h("ul", [h("li", h("span", class_=f"swatch {cls}"), label) for cls, label in items], class_="legend")


