"""The router's decisions: similarity plus term overlap, the threshold, and `eval routing`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SQUAD_DEV

from seal_agent.cli import main
from seal_agent.evaluation.routing import sweep, threshold_for
from seal_agent.memory.lexical import Overlap
from seal_agent.memory.modules import Router

TEXTS = {1: "Genghis Khan ordered the massacre at Otrar after his envoys were killed.",
         2: "Genghis Khan's grandson Kublai founded the Yuan dynasty in China."}


def test_overlap_weighs_rare_terms_and_counts_unknown_ones_against():
    o = Overlap(TEXTS)
    terms = o.terms("Who founded the Yuan dynasty?")
    assert "the" not in terms and "who" not in terms  # stop words carry nothing
    assert o.score(terms, 2) == 1.0 and o.score(terms, 1) == 0.0
    # a term both passages share weighs less than one only module 2 has
    shared, rare = o.terms("Khan"), o.terms("Kublai")
    assert shared["khan"] < rare["kublai"]
    # a term no passage has weighs as much as the rarest, and is missing from every module
    mixed = o.terms("Kublai zeppelin")
    assert mixed["zeppelin"] == max(mixed.values()) and o.score(mixed, 2) == pytest.approx(0.5)
    assert Overlap({}).terms("anything") == {} and o.score({}, 1) == 0.0
    # a module's title says nothing about which of its article's passages a question is about
    titled = Overlap(TEXTS, titles={1: "Genghis Khan", 2: "Kublai"})
    q = titled.terms("Kublai Yuan zeppelin")
    assert o.score(q, 2) == pytest.approx(2 / 3, abs=0.02) and titled.score(q, 2) == pytest.approx(0.5)
    assert titled.score(titled.terms("Kublai"), 2) == 0.0 and titled.score(titled.terms("Khan"), 1) == 0.0


class _Sized:
    name, dim = "given", 4


def _router(threshold: float, weight: float) -> Router:
    # Both modules' keys are the same vector: the embedding alone cannot tell them apart.
    v = np.array([[1.0, 0.0, 0.0, 0.0]] * 2, dtype=np.float32)
    return Router(_Sized(), np.array([1, 2]), v, threshold, texts=TEXTS, lexical_weight=weight)


def test_the_rarer_words_pick_the_module_the_embedding_cannot():
    q = np.array([[0.6, 0.8, 0.0, 0.0]], dtype=np.float32)  # similarity 0.6 to both
    [r] = _router(0.0, 0.4).route_vectors(q, ["Who founded the Yuan dynasty?"])
    assert (r.nearest, r.module) == (2, 2)
    assert r.similarity == pytest.approx(0.6) and r.overlap == 1.0 and r.score == pytest.approx(1.0)
    [r] = _router(0.0, 0.4).route_vectors(q, ["What happened at Otrar?"])
    assert r.nearest == 1
    # the threshold is met only with the overlap's share: weight 0 leaves the question unrouted
    assert _router(0.8, 0.4).route_vectors(q, ["Who founded the Yuan dynasty?"])[0].module == 2
    [plain] = _router(0.8, 0.0).route_vectors(q, ["Who founded the Yuan dynasty?"])
    assert plain.module is None and plain.score == pytest.approx(0.6) and plain.overlap is None
    # exactly at the threshold is applied; just above it is not
    assert _router(1.0, 0.4).route_vectors(q, ["Who founded the Yuan dynasty?"])[0].module == 2
    assert _router(1.0001, 0.4).route_vectors(q, ["Who founded the Yuan dynasty?"])[0].module is None


def test_threshold_for_a_target_and_the_sweep():
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    t = threshold_for(scores, 0.9)
    assert sum(s < t for s in scores) == 9 and 0.9 < t < 0.9001  # the lowest such threshold
    assert sum(s < threshold_for(scores, 1.0) for s in scores) == 10
    assert threshold_for(scores, 0.0) == 0.1 and threshold_for([], 0.9) is None
    rows = sweep([(True, 0.5), (True, 0.9), (False, 0.95)], [0.4, 0.7], [0.5, 0.8, 1.0])
    assert [(r["applied_right"], r["unlearned_no_module"]) for r in rows] == [
        (pytest.approx(2 / 3, abs=1e-4), 0.5), (pytest.approx(1 / 3, abs=1e-4), 1.0), (0.0, 1.0)]


def test_eval_routing_measures_the_router_without_training(tmp_path, tiny_config):
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(json.loads(SQUAD_DEV.read_text())[:6]))
    args = ["--config", tiny_config, "eval", "routing", "--data", data, "--n", "4", "--unlearned", "2", "--json"]
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["questions"] > 0 and d["unlearned_questions"] > 0
    assert d["router_recall_at_1"] >= d["router_applied_right_module"] > 0
    at_k = [d["router_recall_at_k"][k] for k in ("1", "2", "3", "5")]
    assert at_k[0] == d["router_recall_at_1"] and at_k == sorted(at_k) and at_k[-1] == 1.0  # 5 of 4 modules
    t = d["threshold_for_target"]
    assert t is not None and d["sweep"][0]["threshold"] == 0.3
    # the sweep row at the configured threshold's side agrees with the reported shares
    low = [row for row in d["sweep"] if row["threshold"] <= d["route_threshold"]][-1]
    assert low["applied_right"] >= d["router_applied_right_module"]
    bad = CliRunner().invoke(main, [str(a) for a in args[:-1] + ["--seeds", "1,x"]])
    assert bad.exit_code != 0 and "--seeds" in bad.output
    short = CliRunner().invoke(main, [str(a) for a in args[:4] + ["--data", data, "--n", "6"]])
    assert short.exit_code != 0 and "fewer than" in short.output
