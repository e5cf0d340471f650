"""Two "nodes" on one machine (benchmarks/two_nodes.py): every backend exact across them, and
the testbed -- namespaces, the shaped veth pair -- gone afterwards, even after a failure or a
crashed earlier run. Needs root (CI runs as root); without it each test skips saying why."""

from __future__ import annotations

import json

import pytest

from benchmarks import two_nodes
from benchmarks.two_nodes import NAMESPACES, VETHS, TwoNodesUnavailable, TwoNodes, run_two_nodes


def needs_testbed() -> None:
    try:
        TwoNodes.check()
    except TwoNodesUnavailable as why:
        pytest.skip(str(why))


def nothing_left() -> bool:
    namespaces = two_nodes._run("ip", "netns", "list", check=False).stdout.split()
    links = [v for v in VETHS
             if two_nodes._run("ip", "link", "show", v, check=False).returncode == 0]
    return not set(NAMESPACES) & set(namespaces) and not links


def test_every_backend_is_exact_across_two_nodes(tmp_path):
    needs_testbed()
    outputs = run_two_nodes(["-m", "tests.two_node_case", str(tmp_path)], nproc_per_node=2,
                            timeout=240)
    report = "\n".join(f"--- node {n} (exit {code}) ---\n{out[-3000:]}"
                       for n, (code, out) in enumerate(outputs))
    assert all(code == 0 for code, _ in outputs), report
    found = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    # torchrun numbers ranks node by node: ranks 0, 1 in one namespace, 2, 3 in the other
    namespaces = [f["namespace"] for f in found]
    assert namespaces[0] == namespaces[1] != namespaces[2] == namespaces[3], namespaces
    for rank, result in enumerate(found):
        assert set(result["backends"]) == set(two_nodes.BACKENDS)
        for backend, outcome in result["backends"].items():
            assert outcome["ok"], (rank, backend, outcome)
            assert outcome["bytes"] == outcome["expected_bytes"], (rank, backend, outcome)
    assert nothing_left()


def test_testbed_is_removed_when_the_job_fails():
    needs_testbed()
    outputs = run_two_nodes(["-m", "tests.no_such_module_here"], nproc_per_node=1, timeout=120)
    assert all(code != 0 for code, _ in outputs)
    assert nothing_left()


def test_leftovers_of_a_crashed_run_are_removed_first():
    needs_testbed()
    TwoNodes.cleanup()
    two_nodes._run("ip", "netns", "add", NAMESPACES[0])  # as a killed run would leave them
    two_nodes._run("ip", "link", "add", VETHS[0], "type", "veth", "peer", "name", VETHS[1])
    with TwoNodes(rate="100mbit"):
        shaped = two_nodes._run("ip", "netns", "exec", NAMESPACES[1], "tc", "qdisc", "show",
                                "dev", VETHS[1]).stdout
        assert "tbf" in shaped and "100Mbit" in shaped, shaped
        for namespace, veth, address in zip(NAMESPACES, VETHS, two_nodes.ADDRESSES):
            shown = two_nodes._run("ip", "netns", "exec", namespace, "ip", "addr", "show",
                                   "dev", veth).stdout
            assert f"inet {address}/24" in shown and "UP" in shown, shown
    assert nothing_left()


def test_without_root_the_testbed_says_why(monkeypatch):
    monkeypatch.setattr(two_nodes.os, "geteuid", lambda: 1000)
    with pytest.raises(TwoNodesUnavailable, match="needs root"):
        TwoNodes.check()
