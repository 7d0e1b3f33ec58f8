"""Pure decisions of the federation: no I/O, no clocks (`now_s` is an argument), no Ray, no gRPC.

graph (global endpoints) → failover (ejections, priority tiers, leases: the one place ejection
state lives, fed by observations and by health's verdict, the vote over the proxies' health
reports) → render (one ProxyConfig per proxy, deltas; render_l7: what waypoints and ingress
gateways get — routes, listeners, inference pools, waypoint references). trust_graph decides who
federates with whom; explain and planning answer operators' questions from the same objects the renderer uses.
"""
