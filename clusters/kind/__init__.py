"""kind clusters (Docker): the same processes as the lab, installed as Kubernetes manifests.

`waypoint`: the objects of the fleet's Gateways (waypoints, ingress gateways) per cluster.
"""
