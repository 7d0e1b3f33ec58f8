"""The one runner of the kind provider: executes `Plan`s (`clusters.kind.plan`), records what it
created, and is the only place the provider starts processes.

State (`<state dir>/kind-state.json`, written atomically after every change): what `up` created
(kind clusters, background processes with their pid and argv), the facts it learned (the kind
network, node addresses) and the heal commands of active faults. `down` undoes exactly what the
state records, newest first, and nothing else: a kind cluster someone else created with the same
tooling is never touched.

A command that fails stops the plan with a `KindError` that names the step, the command line and
the end of its output. `dry_run` prints the commands instead of running them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from clusters.kind.plan import STATE_FILE, Command, KindFacts, Plan, parse_network
from ztunnel.api.secret_files import make_private_dir, read_secret, write_secret

MAX_OUTPUT_CHARS = 4000


class KindError(RuntimeError):
    """A step of the kind provider failed; the message says which and what it printed."""


@dataclass
class Result:
    command: Command
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@dataclass
class KindState:
    created: list[tuple[str, str]] = field(default_factory=list)
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> {"pid", "argv", "log"}
    facts: dict[str, str] = field(default_factory=dict)
    heal: list[dict[str, Any]] = field(default_factory=list)             # Commands as dicts

    def to_json(self) -> str:
        return json.dumps({"created": self.created, "processes": self.processes, "facts": self.facts,
                           "heal": self.heal}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> KindState:
        d = json.loads(text or "{}")
        return cls([tuple(x) for x in d.get("created", [])], dict(d.get("processes", {})),  # type: ignore[misc]
                    dict(d.get("facts", {})), list(d.get("heal", [])))


def command_to_dict(c: Command) -> dict[str, Any]:
    return {"argv": list(c.argv), "what": c.what, "stdin": c.stdin, "timeout_s": c.timeout_s}


def command_from_dict(d: dict[str, Any]) -> Command:
    return Command(tuple(d["argv"]), str(d["what"]), d.get("stdin"), float(d.get("timeout_s", 300.0)))


Exec = Callable[[Sequence[str], str | None, float, dict[str, str] | None], tuple[int, str, str]]


def _exec(argv: Sequence[str], stdin: str | None, timeout_s: float, env: dict[str, str] | None) -> tuple[int, str, str]:
    try:
        r = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout_s, check=False,
                           env=env)
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: command not found"
    except subprocess.TimeoutExpired as e:
        return 124, str(e.stdout or ""), f"did not finish within {timeout_s:.0f} s"
    return r.returncode, r.stdout, r.stderr


class CommandRunner:
    """Runs plans; keeps `state` on disk in `state_dir` (0700 directory, 0600 file)."""

    def __init__(self, state_dir: Path, *, dry_run: bool = False, out: TextIO | None = None,
                 execute: Exec = _exec, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.state_dir = state_dir
        self.dry_run = dry_run
        self.out = out or sys.stderr
        self.execute = execute
        self.clock, self.sleep = clock, sleep
        self.state = self._load()

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _load(self) -> KindState:
        if self.state_path.exists():
            return KindState.from_json(read_secret(self.state_path).decode())
        return KindState()

    def save(self) -> None:
        if self.dry_run:
            return
        make_private_dir(self.state_dir)
        write_secret(self.state_path, self.state.to_json().encode())

    # --- running ---------------------------------------------------------------------------------

    def run(self, plan: Plan) -> list[Result]:
        results = []
        for i, c in enumerate(plan.commands, start=1):
            self.out.write(f"[{i}/{len(plan.commands)}] {c.what}\n")
            if self.dry_run:
                self.out.write(f"    {c.shell()}\n")
                results.append(Result(c, 0, "", "", 0.0))
                continue
            results.append(self.run_one(c))
        return results

    def run_one(self, c: Command) -> Result:
        if c.argv and c.argv[0] == "meshfed-internal":
            return self._internal(c)
        if c.background:
            return self._spawn(c)
        t0 = self.clock()
        deadline = t0 + c.retry_for_s
        env = {**os.environ, **dict(c.env)} if c.env else None
        while True:
            rc, stdout, stderr = self.execute(c.argv, c.stdin, c.timeout_s, env)
            if rc == 0 or self.clock() >= deadline:
                break
            self.sleep(min(5.0, max(0.5, c.retry_for_s / 60)))
        result = Result(c, rc, stdout, stderr, self.clock() - t0)
        if rc != 0:
            tail = (stderr.strip() or stdout.strip())[-MAX_OUTPUT_CHARS:]
            raise KindError(f"{c.what}: `{c.shell()}` failed (exit {rc}"
                            f"{f', retried for {c.retry_for_s:.0f} s' if c.retry_for_s else ''}):\n{tail}")
        if c.creates is not None and list(c.creates) not in [list(x) for x in self.state.created]:
            self.state.created.append(c.creates)
            self.save()
        if c.fact:
            self.state.facts[c.fact] = stdout.strip()
            self.save()
        return result

    def _spawn(self, c: Command) -> Result:
        log = Path(c.log) if c.log else self.state_dir / f"{c.creates[1] if c.creates else 'process'}.log"
        make_private_dir(log.parent)
        with open(log, "ab") as f:
            p = subprocess.Popen(list(c.argv), stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        name = c.creates[1] if c.creates else str(p.pid)
        self.state.processes[name] = {"pid": p.pid, "argv": list(c.argv), "log": str(log)}
        if c.creates is not None and list(c.creates) not in [list(x) for x in self.state.created]:
            self.state.created.append(c.creates)
        self.save()
        return Result(c, 0, "", "", 0.0)

    def _internal(self, c: Command) -> Result:
        verb, name = c.argv[1], c.argv[2]
        if verb == "stop-process":
            self.stop_process(name)
        elif verb == "start-process":
            proc = self.state.processes.get(name)
            if proc is None:
                raise KindError(f"no {name} process recorded in {self.state_path}; was it started by `lab up`?")
            self._spawn(Command(tuple(proc["argv"]), f"start {name}", background=True, log=str(proc["log"]),
                                creates=("process", name)))
        else:
            raise KindError(f"unknown internal step {verb!r}")
        return Result(c, 0, "", "", 0.0)

    def stop_process(self, name: str, timeout_s: float = 20.0) -> bool:
        """SIGTERM the recorded process (only if its command line is still the recorded one: a
        recycled pid is never signalled), SIGKILL after `timeout_s`. True if it was running."""
        proc = self.state.processes.get(name)
        if proc is None:
            return False
        pid = int(proc["pid"])
        if not _same_process(pid, proc["argv"]):
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _same_process(pid, proc["argv"]):
            time.sleep(0.1)
        if _same_process(pid, proc["argv"]):
            os.kill(pid, signal.SIGKILL)
        return True

    # --- facts ---------------------------------------------------------------------------------------

    def facts(self) -> KindFacts:
        """The kind network and node addresses learned by `plan_clusters` (KindError if missing)."""
        raw = self.state.facts.get("kind-network")
        if not raw:
            raise KindError(f"no kind network recorded in {self.state_path}: run `meshfed lab up --provider kind` first")
        subnet, gateway = parse_network(raw)
        nodes: dict[str, dict[str, str]] = {}
        for key, value in self.state.facts.items():
            if key.startswith("addresses/"):
                nodes[key.split("/", 1)[1]] = dict(json.loads(value))
        return KindFacts(subnet, gateway, nodes)

    def learn_node_addresses(self, clusters: Sequence[str]) -> None:
        """`docker inspect` each node container for its address on the kind network."""
        for cluster in clusters:
            names = [n for n in self.state.facts.get(f"nodes/{cluster}", "").split() if n]
            addrs: dict[str, str] = {}
            for node in names:
                rc, out, err = self.execute(("docker", "inspect", node, "--format",
                                             "{{(index .NetworkSettings.Networks \"kind\").IPAddress}}"), None, 30, None)
                if rc != 0:
                    raise KindError(f"docker inspect {node} failed: {err.strip()[:300]}")
                addrs[node] = out.strip()
            self.state.facts[f"addresses/{cluster}"] = json.dumps(addrs)
        self.save()


def _same_process(pid: int, argv: Sequence[str]) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return [a.decode(errors="replace") for a in cmdline if a] == list(argv)
