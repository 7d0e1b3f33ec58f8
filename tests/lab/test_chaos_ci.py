"""The chaos CI subset, as CI runs it: `meshfed chaos run examples/chaos --suite ci` (crash, silent cut,
gateway, controller, API outage, bad commit) in one lab, plus the README's example experiment written
out exactly as the README shows it, plus an experiment broken on purpose (maxFailed: 0 on a fault that
loses requests). One invocation of the real CLI, one lab (root; ~7 min on the 2-core box).

What is proven:
- every CI experiment passes: its expectations held, with a report (markdown, PNG, figures) each;
- the README's example runs and reports as written (a user can start from it);
- the broken expectation makes `chaos run` exit 1, and the failure names the expectation, the
  measured figure and the requests behind it — on the terminal and in the JUnit file;
- the JUnit file parses (xml.etree), one testcase per experiment;
- the CI subset's experiments fit the CI budget (10 minutes).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CI_SUBSET = {"backend-crash", "backend-silent-cut", "gateway-crash", "controller-down", "api-outage-freeze",
             "bad-commit"}
CI_BUDGET_S = 600.0

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1500)]


def readme_experiment() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- readme-experiment: begin -->\n```yaml\n(.*?)```\n<!-- readme-experiment: end -->",
                      text, re.S)
    assert block, "the README's example experiment (between the readme-experiment markers) is missing"
    return block.group(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, float]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces)")
    tmp = tmp_path_factory.mktemp("chaos-ci")
    mine = tmp / "examples" / "chaos"
    mine.mkdir(parents=True)
    (mine / "south-checkout-crash.yaml").write_text(readme_experiment())
    out, junit = tmp / "out", tmp / "junit.xml"
    state_dir = Path(os.environ.get("MESHFED_CHAOS_CI_STATE_DIR", f"/tmp/mf-chaos-ci-{os.getpid()}"))
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "federation.cli.main", "chaos", "run", "examples/chaos", "--suite", "ci",
         str(mine / "south-checkout-crash.yaml"), "tests/lab/chaos/broken-max-failed.yaml",
         "--fleet", "examples/fleet", "--junit", str(junit), "--out", str(out), "--state-dir", str(state_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=1400, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    took = time.monotonic() - t0
    print(r.stdout[-6000:], r.stderr[-3000:], sep="\n")
    return r, tmp, took


def _cases(tmp: Path) -> dict[str, ET.Element]:
    root = ET.parse(tmp / "junit.xml").getroot()
    return {c.attrib["name"]: c for c in root.iter("testcase")}


def test_the_ci_subset_passes_with_a_report_each(run: tuple[subprocess.CompletedProcess[str], Path, float]) -> None:
    _, tmp, _ = run
    cases = _cases(tmp)
    assert set(cases) == CI_SUBSET | {"south-checkout-crash", "broken-max-failed"}, sorted(cases)
    for name in CI_SUBSET:
        bad = [el for el in cases[name] if el.tag in ("failure", "error")]
        assert not bad, f"{name}: {bad[0].attrib.get('message')}\n{bad[0].text}"
        for f in ("report.md", "timeline.png", "figures.json", "verdicts.json"):
            assert (tmp / "out" / name / f).stat().st_size > 0, (name, f)
        assert (tmp / "out" / name / "report.md").read_text().startswith(f"# {name}: ")


def test_the_readme_example_runs_as_written(run: tuple[subprocess.CompletedProcess[str], Path, float]) -> None:
    _, tmp, _ = run
    case = _cases(tmp)["south-checkout-crash"]
    bad = [el for el in case if el.tag in ("failure", "error")]
    assert not bad, f"{bad[0].attrib.get('message')}\n{bad[0].text}"
    assert "**Result: PASSED**" in (tmp / "out" / "south-checkout-crash" / "report.md").read_text()


def test_a_broken_expectation_fails_the_run_and_names_the_requests(
        run: tuple[subprocess.CompletedProcess[str], Path, float]) -> None:
    r, tmp, _ = run
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert re.search(r"east: maxFailed <= 0: measured \d+ \(tests/lab/chaos/broken-max-failed.yaml:\d+:\d+\)",
                     r.stdout), r.stdout[-3000:]
    assert re.search(r"request seq \d+ at t=\+[\d.]+s: fail", r.stdout)
    failure = _cases(tmp)["broken-max-failed"].find("failure")
    assert failure is not None and failure.attrib["message"].startswith("east: maxFailed <= 0: measured ")
    assert "failed request(s)" in (failure.text or "") and "request seq" in (failure.text or "")


def test_the_ci_subset_fits_the_ci_budget(run: tuple[subprocess.CompletedProcess[str], Path, float]) -> None:
    _, tmp, took = run
    cases = _cases(tmp)
    subset_s = sum(float(cases[n].attrib["time"]) for n in CI_SUBSET)
    print(f"CI subset: {subset_s:.0f} s of experiments; the whole invocation (lab up included, two extra "
          f"experiments) {took:.0f} s")
    assert subset_s <= CI_BUDGET_S
