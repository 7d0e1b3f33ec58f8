"""diff_snapshots: objects added, removed, changed with their changed fields."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gitops
from gitops.plan import ChangeAction, diff_snapshots
from tests.unit.gitops.conftest import EXAMPLE

MakeFleet = Callable[..., Path]


def test_no_change_is_empty() -> None:
    a = gitops.load_worktree(EXAMPLE)
    b = gitops.load_worktree(EXAMPLE)
    result = diff_snapshots(a, b)
    assert result.changes == () and not result.changed


def test_changed_field_added_and_removed_objects(fleet_copy: MakeFleet) -> None:
    old = gitops.load_worktree(EXAMPLE)
    root = fleet_copy(
        ("replace", "policies/shop/checkout-canary.yaml", "weight: 90", "weight: 50"),
        ("replace", "policies/shop/checkout-canary.yaml", "weight: 10", "weight: 50"),
        ("delete", "policies/shop/checkout-allow-frontend.yaml"),
        ("write", "services/shop/payments.yaml",
         "apiVersion: meshfed.dev/v1alpha1\nkind: GlobalService\nmetadata:\n  name: payments\n  namespace: shop\n"
         "spec:\n  exportFrom: [west]\n  serviceAccount: payments\n  ports:\n    - name: tcp\n      port: 9000\n"),
    )
    new = gitops.load_worktree(root)
    result = diff_snapshots(old, new)
    by = {(c.action, str(c.obj)): c for c in result.changes}
    assert set(by) == {
        (ChangeAction.ADDED, "GlobalService shop/payments"),
        (ChangeAction.REMOVED, "AuthorizationPolicy shop/checkout-allow-frontend"),
        (ChangeAction.CHANGED, "HTTPRoute shop/checkout-canary"),
    }
    route = by[(ChangeAction.CHANGED, "HTTPRoute shop/checkout-canary")]
    assert [(f.path, f.old, f.new) for f in route.fields] == [
        ("rules[0].backends[0].weight", 90, 50), ("rules[0].backends[1].weight", 10, 50)]
    data = result.as_dict()
    assert data["changes"][0]["action"] in {"added", "removed", "changed"}


def test_moving_lines_is_not_a_change(fleet_copy: MakeFleet) -> None:
    root = fleet_copy(("replace", "clusters/east.yaml", "apiVersion", "# a comment that shifts every line\napiVersion"))
    assert diff_snapshots(gitops.load_worktree(EXAMPLE), gitops.load_worktree(root)).changes == ()
