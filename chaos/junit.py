"""JUnit XML for CI: one testsuite per `chaos run`, one testcase per experiment. Pure (text out).

The dialect is the one Jenkins, GitLab and GitHub's test reporters read (the Ant/Surefire
schema): `<failure>` when an expectation did not hold (its message names the expectation and the
measured figure, its text the evidence), `<error>` when the experiment could not run to the end
(the lab failed, a step could not be applied), `<skipped>` for an experiment declared
`expectedFailure` whose expectations failed as declared. Built with ElementTree, so every
message is escaped.
"""

from __future__ import annotations

import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from chaos.expect import Verdict

PASSED, FAILED, ERROR, XFAIL, XPASS = "passed", "failed", "error", "xfail", "xpass"


@dataclass(frozen=True, slots=True)
class CaseResult:
    """What JUnit needs of one experiment's outcome."""

    name: str
    file: str
    status: str                    # PASSED | FAILED | ERROR | XFAIL | XPASS
    duration_s: float
    verdicts: tuple[Verdict, ...]
    error: str = ""
    expected_failure: str = ""
    report: str = ""               # where the report is (system-out names it)


def failure_text(verdicts: Sequence[Verdict]) -> str:
    """Every failed verdict with its evidence, as a reader of a CI log wants it."""
    out: list[str] = []
    for v in verdicts:
        if v.ok:
            continue
        out.append(f"FAILED {v.message()}")
        out += [f"    {line}" for line in v.evidence]
    return "\n".join(out)


def to_xml(cases: Sequence[CaseResult], suite: str = "meshfed chaos", timestamp_s: float | None = None) -> str:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp_s if timestamp_s is not None else time.time()))
    counts = {"tests": len(cases), "failures": sum(c.status == FAILED for c in cases),
              "errors": sum(c.status == ERROR for c in cases), "skipped": sum(c.status == XFAIL for c in cases)}
    total = f"{sum(c.duration_s for c in cases):.3f}"
    attrs = {k: str(v) for k, v in counts.items()}
    root = ET.Element("testsuites", {"name": suite, "time": total, **attrs})
    ts_el = ET.SubElement(root, "testsuite", {"name": suite, "timestamp": ts, "hostname": socket.gethostname(),
                                              "time": total, **attrs})
    for c in cases:
        tc = ET.SubElement(ts_el, "testcase", classname="meshfed.chaos", name=c.name, file=c.file,
                           time=f"{c.duration_s:.3f}")
        failed = [v for v in c.verdicts if not v.ok]
        if c.status == FAILED:
            el = ET.SubElement(tc, "failure", type="ExpectationNotMet",
                               message="; ".join(v.message() for v in failed) or "an expectation did not hold")
            el.text = failure_text(c.verdicts)
        elif c.status == ERROR:
            el = ET.SubElement(tc, "error", type="ExperimentError", message=c.error.splitlines()[0] if c.error else "")
            el.text = c.error + ("\n" + failure_text(c.verdicts) if failed else "")
        elif c.status == XFAIL:
            ET.SubElement(tc, "skipped", message=f"expected failure: {c.expected_failure}").text = failure_text(c.verdicts)
        out = [f"{'ok  ' if v.ok else 'FAIL'} {v.message()}" for v in c.verdicts]
        if c.status == XPASS:
            out.insert(0, f"declared expectedFailure ({c.expected_failure}) but every expectation held")
        if c.report:
            out.append(f"report: {c.report}")
        ET.SubElement(tc, "system-out").text = "\n".join(out)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
