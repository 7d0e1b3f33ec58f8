"""examples/broken/*: each is the good fleet with one mistake; validate names it and exits 1."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import gitops
from federation.cli.main import cli

BROKEN = Path(__file__).resolve().parents[3] / "examples" / "broken"

EXPECTED = [
    ("max-ejection-percent-too-small", "MF0505", "policies/shop/checkout.yaml:14:7"),
    ("failover-without-outlier-detection", "MF0504", "policies/shop/checkout.yaml:10:7"),
    ("unknown-field", "MF0101", "policies/shop/checkout.yaml:14:7"),
    ("cidr-overlap-same-network", "MF0302", "clusters/west.yaml:20:7"),
    ("claims-other-trust-domain", "MF0402", "clusters/west.yaml:13:3"),
]


def test_every_broken_example_is_covered() -> None:
    assert {p.name for p in BROKEN.iterdir() if p.is_dir()} == {e[0] for e in EXPECTED}


@pytest.mark.parametrize(("case", "code", "loc"), EXPECTED, ids=[e[0] for e in EXPECTED])
def test_broken_example(case: str, code: str, loc: str) -> None:
    problems = gitops.validate_tree(BROKEN / case)
    assert next((p.code, str(p.pos)) for p in problems if p.code == code) == (code, loc)
    result = CliRunner().invoke(cli, ["validate", str(BROKEN / case)])
    assert result.exit_code == 1
    assert any(f"[{code}]" in ln and f" {loc} " in ln for ln in result.output.splitlines())
