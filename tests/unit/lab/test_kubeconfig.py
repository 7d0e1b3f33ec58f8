"""The lab's kubeconfig: one context per cluster, merged without losing others (pure)."""

from __future__ import annotations

from typing import Any

from clusters.lab.apiserver import merge_kubeconfig


def entry(name: str, url: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": name, "cluster": {"server": url}}],
            "users": [{"name": name, "user": {"token": "emulated"}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name}


def test_contexts_accumulate_and_the_first_stays_current() -> None:
    doc: dict[str, Any] = {}
    for name, port in (("lab-east", 1), ("lab-west", 2)):
        doc = merge_kubeconfig(doc, entry(name, f"http://127.0.0.1:{port}"))
    assert [c["name"] for c in doc["contexts"]] == ["lab-east", "lab-west"]
    assert doc["current-context"] == "lab-east"
    assert doc["kind"] == "Config"


def test_a_context_of_the_same_name_is_replaced_not_duplicated() -> None:
    doc = merge_kubeconfig(entry("lab-east", "http://127.0.0.1:1"), entry("lab-east", "http://127.0.0.1:9"))
    assert [c["cluster"]["server"] for c in doc["clusters"]] == ["http://127.0.0.1:9"]
    assert len(doc["users"]) == len(doc["contexts"]) == 1
