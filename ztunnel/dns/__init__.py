"""DNS for global names in the node proxy, as Istio's ztunnel DNS proxy does it.

Pods keep the resolver their cluster gives them (`nameserver <kube-dns clusterIP>` in resolv.conf);
the node's iptables redirect their udp/53 and tcp/53 to the node proxy's DNS port (15053,
`ztunnel.api.ports.DNS_CAPTURE_PORT`). The proxy answers the names of the mesh's global services
(`<svc>.<ns>.svc.clusterset.local` and the Federation's own clustersetDomain) with the VIP its
config carries, and forwards every other query unchanged to the upstream resolver.

  answer   pure: a query's bytes in, a reply (or a query to forward) out; truncation; no I/O
  server   asyncio adapter: the UDP and TCP listeners, the forwarder (bounded, with timeouts)

dnspython is reached only from this room (parsing and encoding wire messages).
"""
