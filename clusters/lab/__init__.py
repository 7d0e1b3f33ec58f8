"""The local lab: clusters as network namespaces inside a private `unshare` sandbox.

topology (pure address plan + `ip` executor), sandbox, kubelet, demo_server, loadgen, faults,
gitserver, portal and lab (LabRunner on the host side, Supervisor inside the sandbox).
"""
