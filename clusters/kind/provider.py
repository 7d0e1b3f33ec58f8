"""`meshfed lab up|down|fault --provider kind`: preflight, then the plans, through the one runner.

    up     preflight (fail fast, nothing created) -> plan_clusters -> facts -> plan_install
    down   plan_down of what the state records (the controller, then each kind cluster it made)
    fault  plan_fault; its heal commands are recorded; heal runs them (newest first)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from clusters.kind import preflight
from clusters.kind.plan import (
    KindOptions,
    KindPlanError,
    Plan,
    plan_clusters,
    plan_down,
    plan_fault,
    plan_install,
)
from clusters.kind.runner import CommandRunner, KindError, command_from_dict, command_to_dict
from gitops.model import ConfigSnapshot


class PreflightFailed(KindError):
    """This machine lacks what kind needs; the message lists each missing piece with its fix."""


class KindProvider:
    def __init__(self, opts: KindOptions, *, dry_run: bool = False, out: TextIO | None = None,
                 probe: Callable[[], preflight.HostFacts] = preflight.probe,
                 runner: CommandRunner | None = None) -> None:
        self.opts = opts
        self.probe = probe
        self.runner = runner or CommandRunner(opts.state_dir, dry_run=dry_run, out=out)

    def preflight(self, snapshot: ConfigSnapshot | None) -> list[preflight.Check]:
        return preflight.evaluate(self.probe(), snapshot)

    def up(self, snapshot: ConfigSnapshot) -> dict[str, Any]:
        checks = self.preflight(snapshot)
        bad = preflight.failed(checks)
        if bad:
            raise PreflightFailed("kind cannot run here yet; nothing was created:\n" + preflight.report(bad))
        if self.runner.state.created:
            raise KindError(f"{self.runner.state_path} records a kind lab already ({self.runner.state.created}); "
                            f"`meshfed lab down --provider kind --state-dir {self.opts.state_dir}` first")
        try:
            self.runner.run(plan_clusters(snapshot, self.opts))
            if self.runner.dry_run:
                return {"dry_run": True}
            self.runner.learn_node_addresses(sorted(snapshot.clusters))
            self.runner.run(plan_install(snapshot, self.opts, self.runner.facts()))
        except KindPlanError as e:
            raise KindError(str(e)) from e
        return self.summary()

    def summary(self) -> dict[str, Any]:
        st = self.runner.state
        return {"kubeconfig": str(self.opts.kubeconfig), "created": st.created,
                "contexts": [f"kind-{n}" for what, n in st.created if what == "kind-cluster"],
                "controller": st.processes.get("controller", {}), "controller_status": "http://127.0.0.1:15014"}

    def down(self) -> list[str]:
        created = list(self.runner.state.created)
        self.runner.run(plan_down(created, self.opts))
        if not self.runner.dry_run:
            self.runner.state.created.clear()
            self.runner.state.processes.clear()
            self.runner.state.heal.clear()
            self.runner.save()
        return [f"{what} {name}" for what, name in created]

    def fault(self, snapshot: ConfigSnapshot, kind: str, target: str, names: Sequence[str]) -> list[str]:
        try:
            f = plan_fault(snapshot, self.opts, self.runner.facts(), kind, target, names)
        except KindPlanError as e:
            raise KindError(str(e)) from e
        self.runner.run(Plan(f.apply))
        self.runner.state.heal.extend(command_to_dict(c) for c in f.heal)
        self.runner.save()
        return [c.what for c in f.apply]

    def heal(self) -> list[str]:
        cmds = [command_from_dict(d) for d in reversed(self.runner.state.heal)]
        self.runner.run(Plan(tuple(cmds)))
        self.runner.state.heal.clear()
        self.runner.save()
        return [c.what for c in cmds]


def default_state_dir() -> Path:
    return Path(os.environ.get("MESHFED_KIND_DIR") or Path.home() / ".meshfed" / "kind")


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)
