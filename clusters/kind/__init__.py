"""kind clusters (Docker): the same processes as the lab, installed as Kubernetes manifests.

Pure: `manifests` (fleet + cluster -> objects: a member cluster with the fleet's Gateways (waypoints,
ingress gateways), an in-cluster controller, the LabCluster's workloads), `plan` (the commands of
`lab up|down|fault --provider kind`), `preflight.evaluate` (what this machine lacks, with fixes). Acting: `runner.CommandRunner` (the one
place commands run; it records what it created), `provider.KindProvider` (preflight, then plans).
"""
