"""The commit gate for staged CA root rotation: may the controller apply this fleet revision?

`federation.core.rotation.decide_rotation` judges one trust domain's change of `CaSpec`. This module
applies it to a whole commit, as the reconciler's gate step does before anything of the new
snapshot takes effect (before CAs are loaded — which would switch the signer — and before any
config is rendered or pushed):

- for every trust domain present in both the last *applied* CA specs and the new snapshot, call
  `decide_rotation(previous, new, live leaf not-after per root, now)`; a domain new in this commit
  is its first spec (nothing to rotate), a removed one is not a rotation;
- every rejection becomes a `Problem` MF0407 ("unsafe CA root rotation") positioned at the
  TrustDomain's `spec.ca.roots`, with the decision's reasons as the message; the reconciler then
  treats the commit exactly like an invalid one (last applied revision unchanged, the attempt and
  its problems recorded, proxies keep their config).

"Last applied" comes from the reconciler's applied snapshot or, after a restart before any
snapshot was applied, from the specs the store recorded at the last checkpoint (so a restart does
not turn the next commit into an unchecked "first" spec). The live-leaf figures come from the
store too: the config server records, per (trust domain, signing root name), the latest not-after
of every leaf it issued.

Pure: the caller passes the lookups and `now_s`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from federation.core.rotation import RotationDecision, decide_rotation
from gitops.model import CaMode, CaRoot, CaSpec, ConfigSnapshot
from gitops.problems import ObjectRef, Problem
from gitops.schema import find_pos

UNSAFE_ROTATION_CODE = "MF0407"
UNSAFE_ROTATION_HINT = ("rotate a root in three commits, each applied before the next: publish the new root "
                        "(signing: false), switch signing: true to it, retire the old root once its last leaf has "
                        "expired. The proxies keep the last applied revision until a safe commit arrives")

LiveLeaves = Callable[[str], Mapping[str, float]]   # trust domain -> root name -> latest leaf not-after (s)


def ca_spec_to_dict(spec: CaSpec) -> dict[str, Any]:
    return {"mode": spec.mode.value, "roots": [[r.name, r.signing] for r in spec.roots],
            "bundle_file": spec.bundle_file, "workload_cert_ttl_s": spec.workload_cert_ttl_s}


def ca_spec_from_dict(d: Mapping[str, Any]) -> CaSpec:
    return CaSpec(mode=CaMode(d["mode"]), roots=tuple(CaRoot(str(n), bool(s)) for n, s in d["roots"]),
                  bundle_file=d.get("bundle_file"), workload_cert_ttl_s=float(d["workload_cert_ttl_s"]))


def ca_specs_of(snapshot: ConfigSnapshot) -> dict[str, CaSpec]:
    return {str(name): td.ca for name, td in snapshot.trust_domains.items()}


def decide_commit(previous: Mapping[str, CaSpec], new: ConfigSnapshot, live_leaves: LiveLeaves,
                  now_s: float) -> dict[str, RotationDecision]:
    """The rotation decision of every trust domain present in both `previous` and `new`."""
    out: dict[str, RotationDecision] = {}
    for name, td in sorted(new.trust_domains.items()):
        before = previous.get(str(name))
        if before is None:
            continue
        out[str(name)] = decide_rotation(before, td.ca, live_leaves(str(name)), now_s, trust_domain=str(name))
    return out


def gate_commit(previous: Mapping[str, CaSpec], new: ConfigSnapshot, live_leaves: LiveLeaves,
                now_s: float) -> list[Problem]:
    """Problems (MF0407) that reject the commit; empty when every rotation in it is safe."""
    problems: list[Problem] = []
    decisions = decide_commit(previous, new, live_leaves, now_s)
    for name, td in sorted(new.trust_domains.items()):
        decision = decisions.get(str(name))
        if decision is None or decision.accepted:
            continue
        problems.append(Problem(UNSAFE_ROTATION_CODE, "unsafe CA root rotation: " + decision.reason,
                                find_pos(td.field_pos, "spec.ca.roots", td.pos), UNSAFE_ROTATION_HINT,
                                ObjectRef("TrustDomain", str(name))))
    return problems
