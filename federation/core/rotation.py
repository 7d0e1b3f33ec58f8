"""Staged root rotation, driven from Git: decide whether a new `CaSpec` may follow the applied one.

A managed trust domain rotates its root in three commits, each one applied before the next:

1. **publish**: add the new root with `signing: false`. Bundles now carry old + new roots; every
   proxy learns to trust the new root before any certificate signed by it exists.
2. **switch**: move `signing: true` to the new root (it must already have been published, i.e. be
   in the previously *applied* spec). New leaves come from the new root; old leaves still verify.
3. **retire**: drop the old root, once the longest-lived leaf it signed has expired (plus the
   verifier's clock-skew margin). Removing it earlier would break those live certificates.

`decide_rotation(previous, new, live_leaf_not_after_s, now_s)` is pure: the controller passes the
spec it last applied, the spec of the commit being attempted, and, per root name, the latest
not-after among the leaves that root signed that may still be in use. It returns the stages the
commit performs, or a rejection with the reason (which stage was skipped, which live certificates
would break and when the change becomes safe). A rejected commit leaves the applied spec in force
(last known good).

Rules, checked for every change in the commit (several independent changes may share a commit,
e.g. publishing root-3 while retiring root-1 whose leaves have all expired):
- the new spec has exactly one signing root and unique root names;
- an added root must not be signing (that would skip *publish*);
- a new signer must be a root present in the previous spec (else it skipped *publish*);
- a removed root must not be the previous signer (that would skip *switch* + wait), and must have
  no live leaves (not-after + margin > now), else the commit would invalidate them;
- switching between Managed and External replaces every root at once: only allowed when no leaf
  of the old CA is live.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from gitops.model import CaMode, CaSpec

DEFAULT_RETIRE_MARGIN_S = 120.0  # the verifier's clock-skew tolerance (ztunnel.api.verify.DEFAULT_CLOCK_SKEW_S)


class RotationStage(str, enum.Enum):
    INITIAL = "Initial"        # first applied spec of a trust domain
    UNCHANGED = "Unchanged"
    PUBLISH = "Publish"
    SWITCH = "Switch"
    RETIRE = "Retire"
    MODE_CHANGE = "ModeChange"
    EXTERNAL = "External"      # an external CA's roots rotate in its bundle (sequence rules apply)


@dataclass(frozen=True, slots=True)
class RotationDecision:
    accepted: bool
    stages: tuple[RotationStage, ...]
    reasons: tuple[str, ...]   # why rejected (empty when accepted)
    notes: tuple[str, ...] = ()  # what the accepted commit does, for status and logs

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _signers(spec: CaSpec) -> list[str]:
    return [r.name for r in spec.roots if r.signing]


def check_spec(spec: CaSpec) -> list[str]:
    """Shape rules of one managed spec (also useful on its own for validation)."""
    if spec.mode is not CaMode.MANAGED:
        return [] if spec.bundle_file else ["an External CA needs bundleFile (its SPIFFE bundle in the repo)"]
    problems: list[str] = []
    names = [r.name for r in spec.roots]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"root names must be unique; repeated: {', '.join(dupes)}")
    signers = _signers(spec)
    if len(signers) != 1:
        problems.append(f"exactly one root must have signing: true, found {len(signers)}"
                        + (f" ({', '.join(signers)})" if signers else ""))
    return problems


def decide_rotation(previous: CaSpec | None, new: CaSpec, live_leaf_not_after_s: Mapping[str, float],
                    now_s: float, *, trust_domain: str = "",
                    retire_margin_s: float = DEFAULT_RETIRE_MARGIN_S) -> RotationDecision:
    """Accept or reject moving a trust domain's CA from `previous` (applied) to `new` (attempted)."""
    td = f"trust domain {trust_domain}: " if trust_domain else ""
    shape = check_spec(new)
    if shape:
        return RotationDecision(False, (), tuple(td + p for p in shape))
    if previous is None:
        return RotationDecision(True, (RotationStage.INITIAL,), (), (f"{td}first CA spec applied",))

    def live_after(root: str) -> float | None:
        na = live_leaf_not_after_s.get(root)
        return na if na is not None and na + retire_margin_s > now_s else None

    if previous.mode is not new.mode:
        live = {r: na for r in live_leaf_not_after_s if (na := live_after(r)) is not None}
        if live:
            last = max(live.values())
            return RotationDecision(False, (RotationStage.MODE_CHANGE,), (
                f"{td}switching the CA from {previous.mode.value} to {new.mode.value} replaces every root at once, "
                f"and certificates signed by {', '.join(sorted(live))} are live until {_iso(last)}; keep the old "
                f"mode until {_iso(last + retire_margin_s)} (or drain those workloads) and commit the switch then",))
        return RotationDecision(True, (RotationStage.MODE_CHANGE,), (), (f"{td}CA mode is now {new.mode.value}",))
    if new.mode is CaMode.EXTERNAL:
        return RotationDecision(True, (RotationStage.EXTERNAL,), (),
                                (f"{td}external CA: root changes follow its bundle's spiffe_sequence",))

    old_names = [r.name for r in previous.roots]
    new_names = [r.name for r in new.roots]
    added = [n for n in new_names if n not in old_names]
    removed = [n for n in old_names if n not in new_names]
    old_signer, new_signer = _signers(previous)[0], _signers(new)[0]

    reasons: list[str] = []
    stages: list[RotationStage] = []
    notes: list[str] = []
    for name in added:
        if name == new_signer:
            reasons.append(
                f"{td}root {name!r} is new and already signing: that skips the publish stage. Commit it with "
                "signing: false first; switch the signer in a later commit, once that bundle is applied everywhere")
        else:
            stages.append(RotationStage.PUBLISH)
            notes.append(f"{td}publish root {name!r} (trusted, not signing)")
    if new_signer != old_signer and new_signer not in added:
        stages.append(RotationStage.SWITCH)
        notes.append(f"{td}signer moves from {old_signer!r} to {new_signer!r}")
    for name in removed:
        if name == old_signer:
            reasons.append(
                f"{td}root {name!r} signs certificates in the applied spec and this commit removes it: that skips "
                f"the switch stage. First move signing: true to another published root, and retire {name!r} in a "
                "later commit after its last leaf has expired")
            continue
        na = live_after(name)
        if na is not None:
            reasons.append(
                f"{td}retiring root {name!r} would invalidate live certificates it signed (the longest-lived "
                f"expires {_iso(na)}); retire it after {_iso(na + retire_margin_s)}")
        else:
            stages.append(RotationStage.RETIRE)
            notes.append(f"{td}retire root {name!r} (no live leaves)")
    if reasons:
        return RotationDecision(False, tuple(dict.fromkeys(stages)), tuple(reasons))
    if not stages:
        return RotationDecision(True, (RotationStage.UNCHANGED,), ())
    return RotationDecision(True, tuple(dict.fromkeys(stages)), (), tuple(notes))
