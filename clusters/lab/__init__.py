"""The local lab: the fleet's clusters in Linux network namespaces inside a private sandbox, with
real processes, an emulated Kubernetes API per cluster, faults, and a control socket.
"""
