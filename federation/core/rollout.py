"""When is a revision applied? The quorum of proxy acknowledgements, decided from plain facts.

A revision that rendered is *applying* until the proxies say they run it; only then is it
*applied* (the store's lastAppliedRevision, and the reference of the staged root rotation gate,
`federation.core.rotation_gate`: a commit is judged against CA specs the proxies received, not
ones the controller merely rendered).

The quorum, per cluster, over the proxies the revision renders that are **connected** now:

1. every one of them has *settled* the revision: ACKed its content, or NACKed it (a push still
   unsent, in flight, or waiting for a retry is not settled); and
2. a strict majority of them ACKed it.

Proxies that are not connected do not count: they receive the latest desired config in full
when they reconnect, before anything else (and a fleet whose proxies are all away would
otherwise never apply anything). A cluster with no connected proxy does not block. A proxy that
NACKs does not block the fleet forever, but a cluster where most proxies refuse a revision never
applies it; the NACKs are in status (STALE, with the reason). A proxy "runs revision R" when its
desired config is R (or a later revision with the same content for it) and its ACKed content
equals its desired content: a commit that does not change a proxy's view needs no push to it.

`decide_rollout` never times out into "applied": past `timeout_s` the answer says `overdue`, and
status/`meshfed check` name the proxies still pending. Pure: facts and `now_s` in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

APPLY_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class ProxyRollout:
    """What the config service knows of one proxy, for one revision."""

    proxy_id: str
    cluster: str
    connected: bool
    state: str          # "acked" | "nacked" | "pending" (unsent, in flight, waiting to retry) | "other"
                        # ("other": its desired config is another revision, e.g. not rendered by it yet)


@dataclass(frozen=True, slots=True)
class RolloutDecision:
    revision: str
    applied: bool
    overdue: bool
    per_cluster: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # cluster -> counts
    pending: tuple[str, ...] = ()      # connected proxies that have not settled (bounded)
    nacked: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "applied": self.applied, "overdue": self.overdue,
                "clusters": {c: dict(v) for c, v in self.per_cluster.items()},
                "pending": list(self.pending), "nacked": list(self.nacked)}


MAX_LISTED = 20


def decide_rollout(revision: str, facts: Iterable[ProxyRollout], since_s: float, now_s: float,
                   timeout_s: float = APPLY_TIMEOUT_S) -> RolloutDecision:
    """Is `revision` applied (see the module docstring)?"""
    per: dict[str, dict[str, int]] = {}
    pending: list[str] = []
    nacked: list[str] = []
    for f in facts:
        if not f.connected:
            continue
        c = per.setdefault(f.cluster, {"connected": 0, "acked": 0, "nacked": 0, "pending": 0})
        c["connected"] += 1
        if f.state == "acked":
            c["acked"] += 1
        elif f.state == "nacked":
            c["nacked"] += 1
            nacked.append(f.proxy_id)
        else:
            c["pending"] += 1
            pending.append(f.proxy_id)
    applied = all(c["pending"] == 0 and 2 * c["acked"] > c["connected"] for c in per.values())
    return RolloutDecision(revision, applied, not applied and now_s - since_s >= timeout_s,
                           {k: per[k] for k in sorted(per)}, tuple(sorted(pending)[:MAX_LISTED]),
                           tuple(sorted(nacked)[:MAX_LISTED]))


def rollout_from_dict(d: Mapping[str, Any]) -> list[ProxyRollout]:
    """Facts as they travel between actors (a list of dicts) -> `ProxyRollout`s."""
    return [ProxyRollout(str(p["proxy"]), str(p["cluster"]), bool(p["connected"]), str(p["state"]))
            for p in d.get("proxies", [])]
