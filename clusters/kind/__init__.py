"""kind clusters (Docker): the same processes as the lab, installed as Kubernetes manifests.
"""
