"""Pure decisions of the federation: no I/O, no clocks (`now_s` is an argument), no Ray, no gRPC.

graph (global endpoints) → failover (outlier state, priority tiers, leases: the one place ejection
state lives) → render (one ProxyConfig per proxy, deltas). trust_graph decides who federates with
whom; explain and planning answer operators' questions from the same objects the renderer uses.
"""
