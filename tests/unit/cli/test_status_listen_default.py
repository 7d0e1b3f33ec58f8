"""The status API listens on loopback unless told otherwise (issue 11, item 16): `meshfed
controller run` without `--status-listen` hands the controller 127.0.0.1, and so does a
`ControllerOptions` built without one (the in-process entry points). Beyond loopback the API needs
its token for everything (tests/integration/test_status_api.py); this is the default that keeps a
controller started without thinking off the network.

The controller itself is not started: `federation.ray.driver.run` is replaced by a recorder of
the options the command built (the unit tier forbids Ray and sockets).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from click.testing import CliRunner

import federation.ray.driver as driver
from federation.cli.main import cli
from federation.ray.driver import ControllerOptions


def options_of(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ControllerOptions:
    got: list[ControllerOptions] = []
    monkeypatch.setattr(driver, "run", got.append)
    out = CliRunner().invoke(cli, ["controller", "run", "--repo", str(tmp_path / "fleet"),
                                   "--state-dir", str(tmp_path / "state"), *args])
    assert out.exit_code == 0, out.output
    (opts,) = got
    return opts


def host_of(listen: str) -> str:
    return listen.rpartition(":")[0].strip("[]")


def test_controller_run_serves_the_status_api_on_127_0_0_1_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = options_of([], tmp_path, monkeypatch)
    assert host_of(opts.status_listen) == "127.0.0.1", opts.status_listen
    assert ipaddress.ip_address(host_of(opts.listen)).is_loopback, opts.listen   # gRPC too


def test_an_address_given_is_the_one_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorder sees what the command line says (the default above is not a constant of the test)."""
    opts = options_of(["--status-listen", "0.0.0.0:15014"], tmp_path, monkeypatch)
    assert opts.status_listen == "0.0.0.0:15014"


def test_controller_options_default_to_loopback() -> None:
    assert host_of(ControllerOptions(repo="fleet").status_listen) == "127.0.0.1"
