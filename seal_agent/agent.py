"""SealAgent: the one object the CLI (and later the daemon) talks to.

It owns the state database, the adapter log, the active policy and the live
model (loaded lazily: `history` needs no model). Verbs that change the state
directory (learn, rollback, restem, tasks, policy rollback) first take its
lock (lock.py), so they refuse while another process owns it, whoever calls
them; reading verbs never take it and never repair anything.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from .config import Config, engine_for
from .documents import SUPPORTED
from .errors import SealError
from .learning.learner import DocumentReport, Learner
from .learning.skills import SkillReport
from .memory.adapter_log import AdapterLog
from .memory.knowledge import Knowledge
from .memory.live import LiveModel, discard_uncommitted
from .memory.lock import StateLock
from .memory.modules import ModuleStore
from .memory.policy_versions import PolicyVersions
from .memory.replay import ReplayBank
from .memory.skills import SkillStore
from .memory.state import State
from .policy import Policy, load_active_policy
from .progress import Progress, no_progress
from .qa.answering import Question

log = logging.getLogger(__name__)


def _packaged_policies() -> Path:
    """The policies that ship with seal-agent. A checkout, and the editable install that
    runs from it, has them at the repository's top, where users edit them; a wheel carries
    them inside the package (setup.py puts them there as seal_agent/_policies)."""
    repository = Path(__file__).resolve().parent.parent
    if (repository / "pyproject.toml").is_file() and (repository / "policies").is_dir():
        return repository / "policies"
    return Path(str(resources.files(__package__) / "_policies"))


PACKAGED_POLICIES = _packaged_policies()
# Tasks the daemon schedules (and `seal-agent schedule run` starts).
TASKS = ("replay_check", "consolidate", "restem")


def policy_dir(cfg: Config) -> Path:
    configured = cfg.policy_dir
    if configured.is_dir() or cfg.policy.dir != "policies":
        return configured
    return PACKAGED_POLICIES  # running outside the project dir: use the shipped policies


class SealAgent:
    def __init__(self, cfg: Config, lock: StateLock | None = None, role: str = "Python process"):
        """`lock`: the state directory's lock when the caller holds it already (the daemon);
        otherwise the agent takes it itself on its first change (`role` names it in refusals)."""
        self.cfg = cfg
        # Validate the policy before anything slow or stateful happens.
        self.policy: Policy = load_active_policy(policy_dir(cfg), cfg.policy.active)
        self.qa_policy: Policy | None = (
            load_active_policy(policy_dir(cfg), cfg.replay.qa_policy)
            if cfg.replay.enabled and cfg.replay.generate_qas else None
        )
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.state = State(cfg.state_path("database"))
        self.log = AdapterLog(cfg.state_path("adapters") / "knowledge")
        # memory.mode = "modules": one LoRA module per learned document, routed by retrieval.
        self.modules = ModuleStore(self.state, AdapterLog(cfg.state_path("adapters") / "modules", prefix="m"))
        self.knowledge = Knowledge(cfg, self.state, self.modules, lambda: self.bank.embedder)
        # The promoted self-edit policy adapter (ReSTEM's line of versions).
        self.policy_versions = PolicyVersions(self.state, cfg.state_path("adapters"), self.policy.name)
        # ARC: the recipe policy's own line of versions, and the skill modules of the tasks given.
        self.arc_versions = PolicyVersions(self.state, cfg.state_path("adapters"), cfg.arc.policy)
        self.skills = SkillStore(self.state, AdapterLog(cfg.state_path("adapters") / "skills", prefix="s"))
        self._live: LiveModel | None = None
        self._bank: ReplayBank | None = None
        self._vllm = None  # the vLLM engine on the live weights (engine/vllm.py), started on first use
        self._vllm_weights: int | None = None
        self._engine_lock = threading.Lock()
        self._took_lock = lock is None
        self.lock = lock or StateLock(cfg.state_dir, role)
        if self.lock.held:
            self._repair()

    def own(self) -> None:
        """Take the state directory for changes (held until `close`), then repair what a
        crash left behind. Raises StateBusy, naming the owner, while another process has it."""
        if not self.lock.held:
            self.lock.acquire()
            self._repair()

    def _repair(self) -> None:
        self.log.repair()
        self.policy_versions.log.repair()
        self.modules.log.repair()
        self.arc_versions.log.repair()
        self.skills.log.repair()
        discard_uncommitted(self.state, self.log)
        self.modules.discard_uncommitted()
        self.skills.discard_uncommitted()
        for doc_id in self.state.interrupt_documents():
            log.info("document %d: its learning was interrupted by a stop; marked interrupted", doc_id)

    def close(self) -> None:
        with self._engine_lock:
            if self._vllm is not None:
                self._vllm.retire()  # once the requests in flight are answered
                self._vllm = None
        self.state.close()
        if self._took_lock:
            self.lock.release()

    @property
    def live(self) -> LiveModel:
        if self._live is None:
            self._live = LiveModel(self.cfg, self.state, self.log)
        self._live.ensure_loaded()
        return self._live

    @property
    def bank(self) -> ReplayBank:
        """The replay QA bank (loads the embedding model on first use)."""
        if self._bank is None:
            from .memory.embedding import load_embedder

            self._bank = ReplayBank(self.state, load_embedder(self.cfg), self.cfg.state_path("replay_index"))
        return self._bank

    def vllm(self):
        """The vLLM engine on the live weights: started on first use, and replaced
        by one on the new weights when they change (the old one is retired: it
        finishes the requests it has, then shuts down)."""
        from .engine import start_vllm, weights_version

        live = self.live
        w = weights_version(self.state, live.version)
        with self._engine_lock:
            if self._vllm is None or self._vllm_weights != w:
                engine = start_vllm(self.cfg, live, live.version)
                if self._vllm is not None:
                    self._vllm.retire()
                self._vllm, self._vllm_weights = engine, w
            return self._vllm

    def decoder(self, job: str):
        """What decodes for `job` (config.JOBS): the live model (torch) or a view of
        the vLLM engine on the same weights."""
        return self.vllm().view() if engine_for(self.cfg, job) == "vllm" else self.live.model

    def learning_engine(self):
        """The learner's engine (what starts it): vLLM where engine.generate says so, on
        the modules line (the merge line changes the weights at every update: an engine
        per passage); None: the learner decodes with torch."""
        if engine_for(self.cfg, "generate") != "vllm" or self.cfg.memory.mode != "modules":
            return None
        return self.vllm

    def model_at(self, version: int):
        """(model, tokenizer) holding `version`'s weights, apart from the live model."""
        if self._live is None:
            self._live = LiveModel(self.cfg, self.state, self.log)
        return self._live.build(version), self._live.tokenizer

    # -- verbs -----------------------------------------------------------
    def learner(self, external: str | None = None) -> Learner:
        bank = self.bank if self.cfg.replay.enabled else None
        args = (self.cfg, self.state, self.live, self.policy, bank, self.qa_policy)
        if self.cfg.memory.mode == "modules":
            from .learning.modules import ModuleLearner

            return ModuleLearner(*args, external=external, policy_versions=self.policy_versions,
                                 modules=self.modules, embedder=self.bank.embedder, engine=self.learning_engine())
        return Learner(*args, external=external, policy_versions=self.policy_versions)

    def learn(self, path: Path, progress: Progress = no_progress, max_passages: int | None = None,
              recorded_as: str | None = None) -> DocumentReport | SkillReport:
        """A document into the knowledge; an ARC task file (arc/grids.py) is solved
        instead, and what it trained kept as skill modules (learning/skills.py)."""
        from .arc.grids import is_task_file
        from .learning.skills import learn_tasks

        self.own()
        if is_task_file(path):
            return learn_tasks(self.solver(), self.state, self.skills, path, recorded_as, seed=self.cfg.model.seed)
        return self.learner().learn_file(path, progress, max_passages, recorded_as)

    def ask(self, question: str, max_new_tokens: int | None = None) -> dict[str, Any]:
        """The live version's answer, and the modules it was answered with (and why)."""
        live = self.live
        [a] = self.knowledge.answer(self.decoder("ask"), live.tokenizer, live.version, [Question(question, "")],
                                    max_new_tokens=max_new_tokens)
        return {"question": question, "answer": a.text, "version": live.version,
                "modules": self.knowledge.used(a.route)}

    def history(self) -> list[dict[str, Any]]:
        live = self.state.live_version()
        out = []
        for row in self.state.versions():
            doc = self.state.document(row.document_id) if row.document_id is not None else None
            stats = row.stats
            out.append({
                "version": row.version,
                "parent": row.parent,
                "live": row.version == live,
                "kind": stats.get("kind", "base" if row.parent is None else "merge"),
                "module": stats.get("module"),
                "routed": len(stats.get("routed", [])),
                "absorbed": stats.get("absorbed", []),
                "flagged": stats.get("flagged"),
                "created_at": row.created_at,
                "documents": [doc["path"]] if doc else [],
                "title": doc["title"] if doc else stats.get("base"),
                "passages": row.passage_hashes,
                "final_loss": (stats.get("stats") or {}).get("final_loss"),
                "train_seconds": (stats.get("stats") or {}).get("seconds"),
                "qa": stats.get("qa"),
                "policy": stats.get("policy"),
            })
        return out

    # -- replay bank -------------------------------------------------------
    def _lineage(self) -> list[int]:
        live = self.state.live_version()
        return self.state.lineage(live) if live is not None else []

    def replay_stats(self) -> dict[str, Any]:
        return {**self.bank.stats(self._lineage()), "live_version": self.state.live_version()}

    def replay_search(self, text: str, k: int = 8) -> list[dict[str, Any]]:
        out = []
        for q, score in self.bank.search(text, k):
            doc = self.state.document(q.document_id) if q.document_id is not None else None
            out.append({"id": q.id, "score": round(score, 4), "question": q.question, "answer": q.answer,
                        "title": q.title, "source": q.source, "version": q.version,
                        "document": doc["path"] if doc else None})
        return out

    def replay_check(self, sample: int | None = None, seed: int = 0, document: int | None = None) -> dict[str, Any]:
        """Ask the live model the bank's active QAs (all, a random sample, or one
        `document`'s, each answer then listed); accuracy per document. Results are
        recorded for the live version."""
        import random

        live = self.live
        qas = self.bank.active(self._lineage())
        if document is not None:
            if self.state.document(document) is None:
                raise SealError(f"no document {document}")
            qas = [q for q in qas if q.document_id == document]
        if sample is not None and sample < len(qas):
            qas = sorted(random.Random(seed).sample(qas, sample), key=lambda q: q.id)
        scored, _routes = self.knowledge.evaluate(self.decoder("generate"), live.tokenizer, live.version,
                                                  [q.as_question() for q in qas])
        self.bank.record(live.version, [(q.id, s.correct, s.prediction) for q, s in zip(qas, scored)])
        per_doc: dict[int | None, list[bool]] = {}
        for q, s in zip(qas, scored):
            per_doc.setdefault(q.document_id, []).append(s.correct)
        documents = []
        for doc_id, marks in per_doc.items():
            doc = self.state.document(doc_id) if doc_id is not None else None
            documents.append({"document_id": doc_id, "document": doc["path"] if doc else None,
                              "title": doc["title"] if doc else None, "n": len(marks),
                              "accuracy": round(sum(marks) / len(marks), 4)})
        n = len(scored)
        result = {"version": live.version, "n": n,
                  "accuracy": round(sum(s.correct for s in scored) / n, 4) if n else None, "documents": documents}
        if document is not None:
            result["questions"] = [{"question": q.question, "answer": q.answer, "prediction": s.prediction,
                                    "correct": s.correct} for q, s in zip(qas, scored)]
        return result

    def run_task(self, name: str, should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Run one scheduled task now: `replay_check` (recorded as an event), `consolidate`,
        or `restem` (a policy refresh; `should_stop` lets it end its sampling early)."""
        task, one, arg = name.partition(":")  # replay_check:<document id>: that document's QAs alone
        if task not in TASKS or (one and (task != "replay_check" or not arg.isdigit())):
            raise SealError(f"unknown task '{name}' (known: {', '.join(TASKS)}, replay_check:<document id>)")
        self.own()
        if one:
            result = self.replay_check(document=int(arg))
            self.state.event("replay.check", f"version {result['version']}: document {arg}: replay accuracy "
                             f"{result['accuracy']} on {result['n']} QAs", version=result["version"],
                             document_id=int(arg), data={"accuracy": result["accuracy"], "n": result["n"]})
            return result
        if name == "replay_check":
            result = self.replay_check(self.cfg.schedule.replay_check_sample or None)
            self.state.event("replay.check", f"version {result['version']}: replay accuracy "
                             f"{result['accuracy']} on {result['n']} QAs", version=result["version"],
                             data={"accuracy": result["accuracy"], "n": result["n"]})
            return result
        if name == "consolidate":
            if self.cfg.memory.mode == "modules":
                return self.consolidate(should_stop=should_stop)
            return {"snapshot": self.live.snapshot()}
        if name == "restem":
            record = self.restem(should_stop=should_stop)
            keys = ("round", "decision", "reason", "policy_version", "stopped_early", "seconds")
            return {k: record[k] for k in keys}
        raise AssertionError(name)  # pragma: no cover - every name in TASKS is handled above

    # -- ReSTEM ----------------------------------------------------------------
    def restem(self, *, domain: str = "knowledge", contexts: int | None = None, samples: int | None = None,
               seeds: int | None = None, data: list[Path] = (), should_stop: Callable[[], bool] = lambda: False,
               progress: Progress = no_progress) -> dict[str, Any]:
        """One ReSTEM refresh of the `domain`'s policy (knowledge: the active policy;
        arc: the recipe policy, a line of its own); see restem/refresh.py. Returns its record."""
        from .restem.refresh import RoundDeps, arc_pool, knowledge_pool, round_config, run_round
        from .restem.rounds import RoundLog

        versions = self.versions_of(domain)
        self.own()
        # Checked before the model loads, so a wrong count or policy costs nothing.
        rcfg = round_config(self.cfg.restem, contexts=contexts, samples=samples, seeds=seeds)
        recipe_policy = self.recipe_policy() if domain == "arc" else None
        live = self.live
        deps = RoundDeps(cfg=self.cfg, state=self.state, rounds=RoundLog(self.state), versions=versions,
                         model=live.model, tokenizer=live.tokenizer, knowledge_version=live.version,
                         sampler=self.vllm().view() if engine_for(self.cfg, "generate") == "vllm" and not (
                             recipe_policy is not None and recipe_policy.constrained) else None,
                         executor=self._cluster_pool(live.base_dir))
        if domain == "arc":
            pool = arc_pool(deps, recipe_policy, [(s.task, s.id) for s in self.skills.all()], list(data))
        else:
            pool = knowledge_pool(deps, rcfg, self.policy, self.bank if self.cfg.replay.enabled else None,
                                  list(data))
        return run_round(deps, rcfg, pool, should_stop=should_stop, progress=progress)

    def _cluster_pool(self, base_dir: Path):
        """What builds a round's pool of workers (cluster.executor = "ray"); None: local."""
        if self.cfg.cluster.executor != "ray":
            return None

        def pool(domain, model):
            from .cluster.pool import RayPool, Rewards

            return RayPool(self.cfg, base_dir, model, Rewards(domain.portable()))

        return pool

    # -- ARC -----------------------------------------------------------------
    def recipe_policy(self):
        from .arc.writing import load_recipe_policy

        return load_recipe_policy(policy_dir(self.cfg) / f"{self.cfg.arc.policy}.toml")

    def solver(self, policy_version: int | None = None):
        """What solves ARC tasks on the live weights, its recipes written by the
        promoted ARC policy version (or `policy_version`; 0: the prompt alone)."""
        from .learning.skills import Solver
        from .model.loader import context_length

        policy = self.recipe_policy()
        live = self.live
        # A constrained recipe is decoded by torch (model/constrained.py): vLLM's structured outputs are not used.
        writer = live.model if policy.constrained else self.decoder("generate")
        return Solver(self.cfg, live.model, live.tokenizer, writer, policy,
                      self.arc_versions.adapter_dir(policy_version), self.arc_versions.label(policy_version),
                      context_length(live.model, live.tokenizer))

    def solve(self, tasks_path: Path, solutions: Path | None = None, seed: int = 0,
              recipe: str | None = None) -> Iterator[dict[str, Any]]:
        """ARC tasks: per task, the model writes a recipe (the ARC policy), is
        test-time trained on the demonstrations as it says, and answers the test
        inputs (checked where the solutions are known). `recipe`: a recipe's JSON
        given instead, for every task (refused, saying why, if it does not parse).
        Nothing is kept: the live weights are exactly as they were afterwards. Yields
        each task's result as soon as it is done."""
        from .arc.grids import load_tasks
        from .arc.recipe import parse
        from .arc.writing import Written

        given = None
        if recipe is not None:
            given = Written((recipe,), parse(recipe))
            if given.parsed.recipe is None:
                raise SealError(f"the recipe given is refused: {given.parsed.reason}")
        tasks = load_tasks(tasks_path, solutions)
        solver = self.solver()
        for task in tasks:
            yield solver.solve(task, seed=seed, given=given)

    # -- consolidation -------------------------------------------------------
    def consolidate(self, should_stop: Callable[[], bool] = lambda: False,
                    progress: Progress = no_progress) -> dict[str, Any]:
        """Fold the routed modules into new consolidated weights (learning/consolidation.py)."""
        from .learning.consolidation import Consolidation

        if self.cfg.memory.mode != "modules":
            raise SealError('consolidation folds knowledge modules into the weights: it needs memory.mode = '
                            '"modules" (the merge line merges every update already; its snapshots are '
                            '`adapter_log.snapshot_every`)')
        self.own()
        run = Consolidation(self.cfg, self.state, self.live, self.modules, self.bank, self.policy)
        return run.run(should_stop=should_stop, progress=progress)

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest events, oldest first (decisions of the learner, rollbacks)."""
        rows = self.state.events(limit)[::-1]
        return [{"id": r["id"], "ts": r["ts"], "kind": r["kind"], "version": r["version"],
                 "document_id": r["document_id"], "message": r["message"],
                 "data": json.loads(r["data"]) if r["data"] else None} for r in rows]

    def rollback(self, version: int) -> dict[str, Any]:
        """Make `version` live again, rebuilt and checked against its recorded fingerprints."""
        if self.state.version(version) is None:
            raise SealError(f"no version {version} (see `seal-agent history`)")
        self.own()
        live = self._live or LiveModel(self.cfg, self.state, self.log)
        self._live = live
        previous = self.state.live_version()
        checks = live.load(version, verify=True)
        if not checks["weights"]:
            live.load(previous)
            raise SealError(
                f"version {version} rebuilt with different weights than recorded; "
                f"the live version stays {previous}"
            )
        with self.state.transaction() as c:
            self.state.set_meta("live_version", str(version), conn=c)
            self.state.event("rollback", f"live version {previous} -> {version}", version=version,
                             conn=c, data={"from": previous, "to": version, "verified": checks})
        return {"from": previous, "version": version, "verified": checks}

    def versions_of(self, domain: str) -> PolicyVersions:
        """The line of policy versions of a ReSTEM domain (knowledge: the active policy's)."""
        if domain not in ("knowledge", "arc"):
            raise SealError(f"no ReSTEM domain {domain!r} (knowledge or arc)")
        return self.policy_versions if domain == "knowledge" else self.arc_versions

    def policy_rollback(self, version: int, domain: str = "knowledge") -> dict[str, Any]:
        """Make policy `version` the one that writes self-edits (0 = the prompt alone)."""
        versions = self.versions_of(domain)
        self.own()
        return versions.rollback(version)


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files as given; a directory stands for its supported files (sorted, not recursive)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUPPORTED))
        else:
            out.append(p)
    return out
