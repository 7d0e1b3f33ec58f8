"""The child process of `test_two_node_ray`: a two-node Ray cluster on this machine and the
controller on it.

`ray.cluster_utils.Cluster` starts a head node and one worker node (each its own raylet, told
apart by a custom resource), in a private temp directory. It runs in its own process so that it
neither joins nor disturbs the test session's shared Ray (`conftest.ray_session`), and it never
writes /tmp/ray/ray_current_cluster: `Cluster` would (and delete it again on shutdown), which
would hijack or break every other `ray.init()` on the machine; both calls are disabled here and
the address is passed explicitly.

Protocol: one JSON argument; one JSON line on stdout per event (`started`, `placement`,
`stopped`); commands on stdin, one per line: `placement`, `stop`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

HEAD_RESOURCE = "meshfed_test_head"
WORKER_RESOURCE = "meshfed_test_worker"


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    os.environ.setdefault("RAY_USE_UVLOOP", "0")
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    ray._private.utils.write_ray_address = lambda *_a, **_k: None   # type: ignore[assignment]
    ray._common.utils.reset_ray_address = lambda *_a, **_k: None    # type: ignore[assignment]

    from federation.ray.driver import Controller, ControllerOptions
    from federation.ray.placement import Placement

    node_args = {"num_cpus": 1, "temp_dir": cfg["temp_dir"], "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "resources": {HEAD_RESOURCE: 1}})
    ctl: Controller | None = None
    try:
        cluster.add_node(**{**node_args, "resources": {WORKER_RESOURCE: 1}})
        ctl = Controller(ControllerOptions(
            repo=cfg["repo"], state_dir=cfg["state_dir"], listen=f"127.0.0.1:{cfg['port']}",
            status_listen="127.0.0.1:0", kubeconfig=cfg["kubeconfig"], insecure=True,
            ray_address=cluster.address, git_poll_interval_s=3600, status_interval_s=0.2, watch_timeout_s=5,
            # the store's heaviest users on the node that does not hold the state
            placement=Placement({"reconciler": {WORKER_RESOURCE: 0.01}, "git": {WORKER_RESOURCE: 0.01}}))).start()
        nodes = {r: n["NodeID"] for n in ray.nodes() if n["Alive"] for r in (HEAD_RESOURCE, WORKER_RESOURCE)
                 if r in n["Resources"]}
        assert ctl.status_server is not None
        emit({"event": "started", "status_url": ctl.status_server.url, "driver_pid": os.getpid(),
              "state_node": ctl.state_node, "nodes": nodes})
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "placement":
                emit({"event": "placement", "placement": ctl.placement()})
            elif cmd == "stop":
                break
    finally:
        if ctl is not None:
            ctl.stop()
        ray.shutdown()
        cluster.shutdown()
        emit({"event": "stopped"})


if __name__ == "__main__":
    main()
