"""The demo / chaos report: a short markdown story with the figures, a PNG timeline, and the figures as JSON.

This is the one place that writes report files; the numbers come from `chaos.analysis` (pure) and
are only formatted here. Layout of `out_dir`:

- `report.md` — for an experiment first its verdict and every expectation (expected, measured,
  evidence for the ones that failed), then the story (every timeline event and each client's
  detect / shift / failback moments, as seconds since the start of the run), the figures table (one
  column per client), requests per phase and who served them, and why any figure could not be
  determined;
- `timeline.png` — one panel per client: x = seconds since start, y = the cluster that served each
  request (colored points, in priority order), failed requests as red crosses and indeterminate
  ones as orange crosses (on their cluster's row when known, else on a "no answer" row), vertical
  lines at fault (red), heal (green), policy push (blue) and other events (grey);
- `figures.json` — `ChaosFigures.as_dict()` per client, for machines.

Matplotlib is driven through `Figure` + `FigureCanvasAgg` directly (no pyplot, no global backend
state), so writing a report works headless and from any thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chaos.analysis import (
    FAIL,
    FAULT_HEALED,
    FAULT_INJECTED,
    INDETERMINATE,
    PHASES,
    POLICY_PUSHED,
    ChaosFigures,
    RequestLike,
    RequestRecord,
    TimelineEvent,
)

if TYPE_CHECKING:
    from chaos.expect import Verdict

NO_ANSWER_ROW = "no answer"
EVENT_STYLE = {FAULT_INJECTED: ("tab:red", "--"), FAULT_HEALED: ("tab:green", "--"),
               POLICY_PUSHED: ("tab:blue", ":"), "push_applied": ("tab:blue", "-."),
               "push_rejected": ("tab:orange", "-.")}
# Cluster colors avoid red / green / blue / orange, which mark failures and events.
CLUSTER_COLORS = ("tab:purple", "tab:cyan", "tab:brown", "tab:olive", "tab:pink", "tab:gray",
                  "black", "gold")

# (label, attribute, unit) rows of the figures table, in story order.
FIGURE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("time to detect", "time_to_detect_ms", "ms"),
    ("time to first symptom", "time_to_symptom_ms", "ms"),
    ("time to shift", "time_to_shift_ms", "ms"),
    ("failed before shift", "failed_before_shift", ""),
    ("indeterminate before shift", "indeterminate_before_shift", ""),
    ("flaps", "flaps", ""),
    ("time to fail back", "time_to_failback_ms", "ms"),
    ("requests", "requests", ""),
    ("failed (whole run)", "failed_requests", ""),
    ("indeterminate (whole run)", "indeterminate_requests", ""),
    ("ok", "ok_pct", "%"),
    ("HTTP statuses (whole run)", "statuses_text", ""),
    ("ok answers by workload", "answered_by_text", ""),
)


@dataclass(frozen=True, slots=True)
class ReportPaths:
    markdown: Path
    timeline_png: Path
    figures_json: Path


RecordsIn = Sequence[RequestLike | Mapping[str, Any]]


def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "%":
        return f"{value:.2f} %"
    return str(value)


def _t0(records_by_client: Mapping[str, Sequence[RequestRecord]], events: Sequence[TimelineEvent]) -> float:
    starts = [r.start_s for recs in records_by_client.values() for r in recs] + [e.at_s for e in events]
    return min(starts) if starts else 0.0


def _story(figures_by_client: Mapping[str, ChaosFigures], events: Sequence[TimelineEvent],
           t0: float) -> list[tuple[float, str]]:
    steps = [(e.at_s - t0, f"{e.kind.replace('_', ' ')}: {e.describe()}") for e in events]
    for client, f in figures_by_client.items():
        if f.fault_at_s is None:
            continue
        if f.time_to_detect_ms is not None:
            steps.append((f.fault_at_s - t0 + f.time_to_detect_ms / 1000.0,
                          f"client {client}: first request showing the fault (detect {f.time_to_detect_ms:.1f} ms)"))
        if f.time_to_shift_ms is not None:
            steps.append((f.fault_at_s - t0 + f.time_to_shift_ms / 1000.0,
                          f"client {client}: traffic served by {f.shift_cluster} "
                          f"(shift {f.time_to_shift_ms:.1f} ms, {f.failed_before_shift} failed, "
                          f"{f.indeterminate_before_shift} indeterminate)"))
        if f.time_to_failback_ms is not None and f.heal_at_s is not None:
            steps.append((f.heal_at_s - t0 + f.time_to_failback_ms / 1000.0,
                          f"client {client}: traffic back on {f.preferred_cluster} "
                          f"(failback {f.time_to_failback_ms:.1f} ms)"))
    return sorted(steps, key=lambda s: s[0])


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_verdicts(verdicts: Sequence[Verdict], status: str, error: str, notes: Sequence[str]) -> list[str]:
    """The experiment's outcome: status, every expectation, evidence for the failed ones."""
    out = [f"**Result: {status.upper()}**" + (f" — {error}" if error else ""), ""]
    out += [f"> {n}" for n in notes]
    if notes:
        out.append("")
    if verdicts:
        out += ["## Expectations", "", "| client | expectation | expected | measured | pass | written at |",
                "|---|---|---|---|---|---|"]
        for v in verdicts:
            expected, measured = _cell(v.expected), _cell(v.measured)
            passed = "yes" if v.ok else "**no**"
            out.append(f"| {v.client or '—'} | {v.name} | {expected} | {measured} | {passed} | {v.pos or ''} |")
        failed = [v for v in verdicts if not v.ok and v.evidence]
        if failed:
            out += ["", "### Evidence for what did not hold", ""]
            for v in failed:
                out.append(f"- **{v.title}** — measured {v.measured}")
                out += [f"  - `{line.strip()}`" for line in v.evidence]
        out.append("")
    return out


def render_markdown(title: str, figures_by_client: Mapping[str, ChaosFigures],
                    events: Sequence[TimelineEvent], t0: float, png_name: str,
                    verdicts: Sequence[Verdict] | None = None, status: str = "", error: str = "",
                    notes: Sequence[str] = ()) -> str:
    """The report text (pure; `write_report` writes it)."""
    clients = list(figures_by_client)
    out = [f"# {title}", ""]
    if status:
        out += render_verdicts(verdicts or (), status, error, notes)
    out += ["## Story", "", "| t (s) | step |", "|---:|---|"]
    out += [f"| {t:+.3f} | {text} |" for t, text in _story(figures_by_client, events, t0)]
    out += ["", "## Figures", ""]
    out += ["| figure | " + " | ".join(clients) + " |", "|---|" + "---:|" * len(clients)]
    for label, attr, unit in FIGURE_ROWS:
        out.append(f"| {label} | " + " | ".join(_fmt(getattr(figures_by_client[c], attr), unit)
                                                 for c in clients) + " |")
    out += ["", "Priority order per client: " + "; ".join(
        f"{c}: {' > '.join(f.priority)}" for c, f in figures_by_client.items()) + "."]
    run_lengths = sorted({f.run_length for f in figures_by_client.values()})
    if run_lengths:
        out.append(f"A shift or failback counts once {'/'.join(map(str, run_lengths))} consecutive requests "
                   "succeed on the new cluster; times are from the fault (or heal) to the first of them.")
    out += ["", "## Requests per phase", "",
            "| client | phase | requests | ok | failed | indeterminate | served by |",
            "|---|---|---:|---:|---:|---:|---|"]
    for c, f in figures_by_client.items():
        for p in f.phases:
            served = ", ".join(f"{k} {n}" for k, n in p.served_by) or "—"
            out.append(f"| {c} | {p.phase} | {p.requests} | {_fmt(p.ok_pct, '%')} | {p.failed} | "
                       f"{p.indeterminate} | {served} |")
    why = [(c, name, r) for c, f in figures_by_client.items() for name, r in f.reasons]
    figure_notes = [(c, n) for c, f in figures_by_client.items() for n in f.notes]
    if why or figure_notes:
        out += ["", "## Not determined, and notes", ""]
        out += [f"- {c}: `{name}` n/a — {r}" for c, name, r in why]
        out += [f"- {c}: {n}" for c, n in figure_notes]
    out += ["", "## Timeline", "", f"![which cluster served each request]({png_name})", ""]
    return "\n".join(out)


def _cluster_rows(figures_by_client: Mapping[str, ChaosFigures],
                  records_by_client: Mapping[str, Sequence[RequestRecord]]) -> list[str]:
    rows: list[str] = []
    for f in figures_by_client.values():
        rows += [c for c in f.priority if c not in rows]
    for recs in records_by_client.values():
        rows += sorted({r.cluster for r in recs if r.cluster} - set(rows))
    return rows


def render_png(path: Path, title: str, figures_by_client: Mapping[str, ChaosFigures],
               records_by_client: Mapping[str, Sequence[RequestRecord]],
               events: Sequence[TimelineEvent], t0: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clients = list(dict.fromkeys([*figures_by_client, *records_by_client]))
    rows = _cluster_rows(figures_by_client, records_by_client)
    y_of = {c: i + 1 for i, c in enumerate(reversed(rows))}  # preferred on top
    labels = [NO_ANSWER_ROW, *reversed(rows)]
    color_of = {c: CLUSTER_COLORS[i % len(CLUSTER_COLORS)] for i, c in enumerate(rows)}

    fig = Figure(figsize=(11.0, 1.2 + 1.9 * max(1, len(clients))), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(clients)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, client in zip(axes, clients or [""], strict=False):
        recs = records_by_client.get(client, ())
        for cluster in rows:
            pts = [r.start_s - t0 for r in recs if r.ok and r.cluster == cluster]
            if pts:
                ax.scatter(pts, [y_of[cluster]] * len(pts), s=9, color=color_of[cluster], label=cluster)
        for outcome, color, label in ((FAIL, "red", "failed"), (INDETERMINATE, "darkorange", "indeterminate")):
            bad = [r for r in recs if r.outcome == outcome]
            if bad:
                ax.scatter([r.start_s - t0 for r in bad], [y_of.get(r.cluster, 0) for r in bad],
                           marker="x", s=28, color=color, label=label, zorder=3)
        for e in events:
            color, style = EVENT_STYLE.get(e.kind, ("tab:gray", "-."))
            ax.axvline(e.at_s - t0, color=color, linestyle=style, linewidth=1.2)
            ax.annotate(e.kind.replace("_", " "), (e.at_s - t0, len(labels) - 0.45), fontsize=7,
                        color=color, rotation=0, ha="left", va="top", annotation_clip=False)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(-0.6, len(labels) - 0.3)
        ax.set_ylabel(f"client {client}" if client else "")
        ax.grid(axis="x", alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xlabel("seconds since start")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(str(path), format="png")


def write_report(out_dir: Path | str, title: str, figures_by_client: Mapping[str, ChaosFigures],
                 records_by_client: Mapping[str, RecordsIn],
                 timeline: Iterable[TimelineEvent | Mapping[str, Any]], *,
                 verdicts: Sequence[Verdict] | None = None, status: str = "", error: str = "",
                 notes: Sequence[str] = ()) -> ReportPaths:
    """Write report.md, timeline.png and figures.json into `out_dir` (created if missing); with a
    `status` (an experiment's), the report opens with its verdicts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    events = sorted((TimelineEvent.coerce(e) for e in timeline), key=lambda e: e.at_s)
    recs = {c: sorted((RequestRecord.coerce(r) for r in rs), key=lambda r: (r.start_s, r.seq))
            for c, rs in records_by_client.items()}
    t0 = _t0(recs, events)
    paths = ReportPaths(markdown=out / "report.md", timeline_png=out / "timeline.png",
                        figures_json=out / "figures.json")
    render_png(paths.timeline_png, title, figures_by_client, recs, events, t0)
    paths.markdown.write_text(render_markdown(title, figures_by_client, events, t0, paths.timeline_png.name,
                                              verdicts, status, error, notes), encoding="utf-8")
    data: dict[str, Any] = {"title": title, "t0_s": t0, "phases": list(PHASES),
                            "clients": {c: f.as_dict() for c, f in figures_by_client.items()}}
    if status:
        data.update(status=status, error=error, verdicts=[v.as_dict() for v in verdicts or ()])
    paths.figures_json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return paths


def summary_markdown(results: Sequence[tuple[str, str, str, Sequence[Verdict]]], header: str = "") -> str:
    """One run's results: (experiment, status, error, verdicts) each → a compact table (one row per
    experiment: its expectations, what was measured, pass) and the full one (one row per
    expectation). Steady-state checks are folded into the compact row's status. Pure."""
    out = [header, ""] if header else []
    out += ["| experiment | expectation | measured | pass |", "|---|---|---|---|"]
    for name, status, error, verdicts in results:
        judged = [v for v in verdicts if not v.name.startswith("steadyState")]
        steady = [v for v in verdicts if v.name.startswith("steadyState")]
        exp_txt = "; ".join(f"{v.client + ' ' if v.client else ''}{v.name} {v.expected}" for v in judged)
        got = "; ".join(v.measured for v in judged)
        if steady and not all(v.ok for v in steady):
            got = "; ".join(f"{v.name}: {v.measured}" for v in steady if not v.ok) + (f"; {got}" if got else "")
        if error:
            got = f"error: {error}"
        verdict = {"passed": "yes", "xfail": "expected failure", "xpass": "yes (declared expected failure)"}.get(
            status, f"**no** ({status})")
        out.append(f"| {name} | {_cell(exp_txt) or '—'} | {_cell(got) or '—'} | {verdict} |")
    out += ["", "<details><summary>every expectation</summary>", "",
            "| experiment | client | expectation | expected | measured | pass |", "|---|---|---|---|---|---|"]
    for name, _status, _error, verdicts in results:
        for v in verdicts:
            out.append(f"| {name} | {v.client or '—'} | {v.name} | {_cell(v.expected)} | {_cell(v.measured)} | "
                       f"{'yes' if v.ok else '**no**'} |")
    out += ["", "</details>", ""]
    return "\n".join(out)
