"""The evaluation harness: the paper's Table 2 ladder on our model.

`eval squad` (single-passage setting): every passage is learned independently
from the same starting model, under each condition, and its questions are
answered without the passage in context:

    base              no update
    passage           inner loop on the passage alone
    self              inner loop on the active policy's self-edit (+ passage)
    external:<name>   inner loop on another model's self-edit carried by the
                      data file (`external_self_edits`), e.g. GPT-4.1's
    in-context        no update, the passage in the prompt (the RAG ceiling)

`eval cpt` (the paper's continued-pretraining setting): one update on the
training data of N passages together, then all their questions.

Scoring is pure logic (Wilson intervals, tallies) apart from the model work,
so it is unit-tested on its own. `run_ladder` is the whole job the CLI calls:
data, conditions, policy adapter and starting model chosen, the run, its files.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..cluster.pool import pool_if_asked
from ..config import Config
from ..documents import Passage, read_qa_passages
from ..errors import SealError
from ..learning.self_edit import from_text, write_self_edits
from ..model.inner_loop import Example, train_adapter
from ..model.loader import compute_dtypes, resolve_base
from ..policy import Policy
from ..progress import Progress, no_progress
from ..qa import answering as qa_mod
from ..qa.grading import Judge
from .conditions import BASE, EXTERNAL, IN_CONTEXT, PASSAGE, SELF, parse_conditions

if TYPE_CHECKING:
    from ..agent import SealAgent
    from ..memory.policy_versions import PolicyVersions


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sensible at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Record:
    """One answered question under one condition."""

    condition: str
    passage: int
    title: str
    question: str
    gold: str
    prediction: str
    correct: bool
    judge: bool | None = None


@dataclass
class ConditionResult:
    condition: str
    correct: int = 0
    n: int = 0
    seconds: float = 0.0
    judge_correct: int | None = None
    passages: int = 0
    train_seconds: float = 0.0
    train_tokens: int = 0
    workers: dict[str, int] | None = None  # on a pool: cases answered per worker

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def as_dict(self) -> dict[str, Any]:
        lo, hi = wilson_interval(self.correct, self.n)
        out = {
            "condition": self.condition,
            "accuracy": round(self.accuracy, 4),
            "n": self.n,
            "correct": self.correct,
            "ci95": [round(lo, 4), round(hi, 4)],
            "seconds": round(self.seconds, 2),
            "passages": self.passages,
            "train_seconds": round(self.train_seconds, 2),
            "train_tokens": self.train_tokens,
        }
        if self.workers is not None:
            out["workers"] = dict(sorted(self.workers.items()))
        if self.judge_correct is not None:
            out["judge_accuracy"] = round(self.judge_correct / self.n, 4) if self.n else 0.0
        return out


@dataclass
class EvalRun:
    kind: str  # squad | cpt
    conditions: list[str]
    results: dict[str, ConditionResult] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)  # on a pool: which worker answered each case
    per_worker: dict[str, Any] | None = None  # on a pool: its per-worker jobs and seconds

    def add(self, condition: str, records: list[Record], seconds: float, train: tuple[float, int] = (0.0, 0),
            passages: int = 1) -> None:
        r = self.results.setdefault(condition, ConditionResult(condition))
        r.n += len(records)
        r.correct += sum(x.correct for x in records)
        r.seconds += seconds
        r.passages += passages
        r.train_seconds += train[0]
        r.train_tokens += train[1]
        judged = [x.judge for x in records if x.judge is not None]
        if judged:
            r.judge_correct = (r.judge_correct or 0) + sum(judged)
        self.records.extend(records)

    def rows(self) -> list[dict[str, Any]]:
        return [self.results[c].as_dict() for c in self.conditions if c in self.results]


class Evaluator:
    """Runs conditions on a starting model; every update is trained and then removed."""

    def __init__(self, cfg: Config, model, tokenizer, policy: Policy, judge=None, seed: int = 0,
                 policy_adapter: Path | None = None):
        self.cfg = cfg
        self.policy_adapter = policy_adapter  # ReSTEM's policy adapter for the self condition
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy
        self.judge = judge
        self.seed = seed
        self.use_chat = cfg.model.use_chat_template
        self.dtypes = compute_dtypes(cfg)

    # -- building blocks -------------------------------------------------
    def training_data(self, condition: str, passage: Passage, index: int) -> list[Example]:
        if condition == PASSAGE:
            return self.policy.examples("", passage.title, passage.text)
        if condition == SELF:
            [edit] = write_self_edits(self.model, self.tokenizer, self.policy, passage, use_chat=self.use_chat,
                                      dtype=self.dtypes.generate, seed=self.seed * 100_003 + index,
                                      adapter=self.policy_adapter)
            return edit.examples
        if condition.startswith(EXTERNAL):
            texts = passage.external_self_edits[condition[len(EXTERNAL):]]
            return from_text(self.policy, passage, texts[(self.seed + index) % len(texts)]).examples
        raise ValueError(condition)

    def answer(self, model, passages: list[tuple[int, Passage]], condition: str) -> list[Record]:
        questions = [(i, q) for i, p in passages for q in qa_mod.questions_of(p.title, p.questions, p.text)]
        scored = qa_mod.evaluate(
            model, self.tokenizer, [q for _, q in questions], self.cfg.qa, use_chat=self.use_chat,
            compute_dtype=self.dtypes.answer, in_context=condition == IN_CONTEXT,
        )
        records = [
            Record(condition, i, s.question.title, s.question.question, s.question.answer, s.prediction, s.correct)
            for (i, _), s in zip(questions, scored)
        ]
        if self.judge is not None:
            for r, s in zip(records, scored):
                r.judge = self.judge.grade(qa_mod.question_text(s.question, self.cfg.qa), r.gold, r.prediction)
        return records

    def updated_answers(self, examples: list[Example], passages: list[tuple[int, Passage]], condition: str,
                        seed: int) -> tuple[list[Record], float, int]:
        """Train an adapter on `examples`, answer, remove the adapter."""
        candidate, stats = train_adapter(self.model, self.tokenizer, examples, self.cfg.lora, self.cfg.train,
                                         seed=seed, compute_dtype=self.dtypes.train)
        try:
            return self.answer(candidate, passages, condition), stats.seconds, stats.tokens
        finally:
            candidate.unload()

    def run_case(self, case: Case) -> tuple[list[Record], float, int]:
        """A case's answers and its training (seconds, tokens): what a local run and a
        pool's worker both do."""
        if case.examples is None:
            return self.answer(self.model, list(case.passages), case.condition), 0.0, 0
        return self.updated_answers(list(case.examples), list(case.passages), case.condition, case.seed)

    def judged(self, records: list[Record]) -> list[Record]:
        """The judge's verdicts added (here, never on a pool's worker: the judge is a
        service this machine reaches)."""
        if self.judge is not None:
            for r in records:
                q = qa_mod.Question(r.question, r.gold, r.title)
                r.judge = self.judge.grade(qa_mod.question_text(q, self.cfg.qa), r.gold, r.prediction)
        return records

    # -- the two settings ------------------------------------------------
    def squad_case(self, condition: str, index: int, passage: Passage) -> Case:
        """A passage under a condition, from the starting model (its self-edit written here)."""
        examples = None if condition in (BASE, IN_CONTEXT) else tuple(self.training_data(condition, passage, index))
        return Case(condition, ((index, passage),), examples, self.seed + index)

    def cpt_case(self, condition: str, passages: list[Passage]) -> Case:
        """One update on the training data of all passages together."""
        indexed = tuple(enumerate(passages))
        examples = None if condition == BASE else tuple(ex for i, p in indexed
                                                        for ex in self.training_data(condition, p, i))
        return Case(condition, indexed, examples, self.seed)

    def squad(self, passages: list[Passage], conditions: list[str], progress: Progress, pool=None) -> EvalRun:
        if pool is not None:  # every case's self-edit written here first, then trained side by side
            cases, writing = [], []
            for i, p in enumerate(passages):
                for c in conditions:
                    t0 = time.perf_counter()
                    cases.append(self.squad_case(c, i, p))
                    writing.append(time.perf_counter() - t0)
            return self._on_pool(EvalRun("squad", conditions), cases, writing, pool, progress)
        run = EvalRun("squad", conditions)
        for index, passage in enumerate(passages):
            progress("passage", {"index": index, "total": len(passages), "title": passage.title})
            for condition in conditions:
                t0 = time.perf_counter()
                records, secs, toks = self.run_case(self.squad_case(condition, index, passage))
                run.add(condition, self.judged(records), time.perf_counter() - t0, (secs, toks))
                progress("condition", {"index": index, "condition": condition,
                                       "correct": sum(r.correct for r in records), "n": len(records)})
        return run

    def cpt(self, passages: list[Passage], conditions: list[str], progress: Progress, pool=None) -> EvalRun:
        if pool is not None:
            cases, writing = [], []
            for c in conditions:
                t0 = time.perf_counter()
                cases.append(self.cpt_case(c, passages))
                writing.append(time.perf_counter() - t0)
            return self._on_pool(EvalRun("cpt", conditions), cases, writing, pool, progress, passages=len(passages))
        run = EvalRun("cpt", conditions)
        for condition in conditions:
            progress("condition-start", {"condition": condition})
            t0 = time.perf_counter()
            records, secs, toks = self.run_case(self.cpt_case(condition, passages))
            run.add(condition, self.judged(records), time.perf_counter() - t0, (secs, toks), passages=len(passages))
            progress("condition", {"condition": condition, "correct": sum(r.correct for r in records),
                                   "n": len(records)})
        return run

    def _on_pool(self, run: EvalRun, cases: list[Case], writing: list[float], pool, progress: Progress,
                 passages: int = 1) -> EvalRun:
        """The cases trained and answered on a pool's workers (`Answers` as its work);
        a condition's seconds are its self-edits' writing here plus its cases' time
        there. The run records which worker answered each case, and the pool's figures."""
        progress("pool", {"cases": len(cases), "workers": pool.stats.workers})
        for case, wrote, ((records, secs, toks), seconds, worker) in zip(cases, writing, pool.map(cases)):
            run.add(case.condition, self.judged(records), wrote + seconds, (secs, toks), passages=passages)
            run.workers.append({"condition": case.condition, "passages": [i for i, _ in case.passages],
                                "worker": worker, "seconds": seconds})
            result = run.results[case.condition]
            result.workers = result.workers or {}
            result.workers[worker] = result.workers.get(worker, 0) + 1
            progress("condition", {"index": case.passages[0][0], "condition": case.condition,
                                   "correct": sum(r.correct for r in records), "n": len(records)})
        run.per_worker = pool.stats.per_worker
        return run


@dataclass(frozen=True)
class Case:
    """One condition on some passages (squad: one, cpt: all): the update's training
    data (None: no update) and its seed."""

    condition: str
    passages: tuple[tuple[int, Passage], ...]
    examples: tuple[Example, ...] | None
    seed: int


@dataclass(frozen=True)
class Answers:
    """A pool's work for `eval squad` / `eval cpt`: a case trained and answered on
    the worker's replica as `Evaluator.run_case` does here."""

    cfg: Config
    tokenizer: Any
    policy: Policy

    def __call__(self, model, case: Case) -> tuple[list[Record], float, int]:
        return Evaluator(self.cfg, model, self.tokenizer, self.policy).run_case(case)


# -- output files ----------------------------------------------------------

def write_outputs(run: EvalRun, out_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """answers.jsonl (one line per question and condition), results.json, chart.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = out_dir / "answers.jsonl"
    with answers.open("w", encoding="utf-8") as f:
        for r in run.records:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    results = out_dir / "results.json"
    results.write_text(json.dumps({**meta, "kind": run.kind, "results": run.rows()}, indent=2) + "\n")
    chart = out_dir / "chart.png"
    bar_chart(run.rows(), chart, title=meta.get("title", f"seal-agent eval {run.kind}"))
    return {"answers": answers, "results": results, "chart": chart}


def bar_chart(rows: list[dict[str, Any]], path: Path, title: str,
              ylabel: str = "no-context accuracy (%)  [95% Wilson CI]") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["condition"] for r in rows]
    acc = [100 * r["accuracy"] for r in rows]
    lo = [100 * (r["accuracy"] - r["ci95"][0]) for r in rows]
    hi = [100 * (r["ci95"][1] - r["accuracy"]) for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 4.2), dpi=110)
    bars = ax.bar(names, acc, yerr=[lo, hi], capsize=4, color="#4C72B0", edgecolor="black", linewidth=0.6)
    for bar, value, r in zip(bars, acc, rows):
        ax.text(bar.get_x() + bar.get_width() / 2, 1, f"{value:.1f}%\nn={r['n']}", ha="center", va="bottom",
                fontsize=8, color="white")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def eval_data(cfg: Config, data: Path | None) -> Path:
    """The file an evaluation reads: `data` (--data), else eval.data of the config."""
    if data is not None:
        return data
    if cfg.eval_data is None:
        raise SealError("no evaluation data: pass --data FILE (SQuAD-style JSON) or set eval.data in config.toml")
    if not cfg.eval_data.exists():
        raise SealError(f"evaluation data {cfg.eval_data} (eval.data) does not exist; "
                        "pass --data FILE or set eval.data in config.toml")
    return cfg.eval_data


def eval_passages(cfg: Config, data: Path | None, n: int | None) -> tuple[Path, list[Passage]]:
    """The file read and, of its first n passages, those with questions."""
    data = eval_data(cfg, data)
    passages = read_qa_passages(data, "evaluation")
    # the data files are already in a fixed random order: the first n are a fair sample
    passages = [p for p in (passages if n is None else passages[:n]) if p.questions]
    if not passages:
        raise SealError(f"{data}: no passages with questions")
    return data, passages


def policy_adapter_for(versions: PolicyVersions, version: int | None,
                       adapter: Path | None) -> tuple[Path | None, str]:
    """The policy adapter that writes the self condition's self-edits, and how results name it:
    an adapter directory given, else policy `version`, else the promoted one (None: the prompt alone)."""
    if adapter is not None and version is not None:
        raise SealError("give --policy-version or --policy-adapter, not both")
    if adapter is not None:
        return adapter, str(adapter)
    version = versions.active() if version is None else version
    return versions.adapter_dir(version), versions.label(version)


def run_eval(kind: str, cfg: Config, model, tokenizer, policy: Policy, passages: list[Passage],
             conditions: list[str], *, judge=None, seed: int = 0, progress: Progress = no_progress,
             policy_adapter: Path | None = None, pool=None) -> EvalRun:
    """The ladder here, or with `pool` (cluster/pool.py, `Answers` as its work) its
    updates trained and answered on the pool's workers; the same records either way."""
    torch.manual_seed(seed)
    evaluator = Evaluator(cfg, model, tokenizer, policy, judge=judge, seed=seed, policy_adapter=policy_adapter)
    if kind == "cpt":
        return evaluator.cpt(passages, conditions, progress, pool=pool)
    return evaluator.squad(passages, conditions, progress, pool=pool)


@dataclass
class Ladder:
    """A finished `eval squad` or `eval cpt`: the run, what it read, where it wrote."""

    run: EvalRun
    data: Path
    passages: int
    judged: bool
    files: dict[str, Path]


def run_ladder(agent: SealAgent, kind: str, conditions: str, *, data: Path | None = None, n: int | None = None,
               seed: int = 0, from_version: int = 0, out_dir: Path | None = None, policy_version: int | None = None,
               policy_adapter: Path | None = None, progress: Progress = no_progress) -> Ladder:
    """`eval squad` / `eval cpt` on `agent`'s state: every update starts from `from_version`; answers.jsonl,
    results.json and chart.png go to `out_dir` (default STATE/state/eval/KIND-TIME)."""
    cfg = agent.cfg
    data, passages = eval_passages(cfg, data, n)
    conds = parse_conditions(conditions, passages, cpt=kind == "cpt")
    judge = Judge(cfg.judge) if cfg.judge.base_url else None
    adapter, policy_label = policy_adapter_for(agent.policy_versions, policy_version, policy_adapter)
    model, tokenizer = agent.model_at(from_version)
    progress("start", {"kind": kind, "passages": len(passages),
                       "total": len(passages) * len(conds) if kind == "squad" else len(conds)})
    t0 = datetime.now()
    # the cluster of ReSTEM's rounds (docs/cluster.md), when cluster.executor = "ray"
    with pool_if_asked(cfg, resolve_base(cfg), model, Answers(cfg, tokenizer, agent.policy)) as pool:
        run = run_eval(kind, cfg, model, tokenizer, agent.policy, passages, conds, judge=judge, seed=seed,
                       progress=progress, policy_adapter=adapter, pool=pool)
    out_dir = out_dir or cfg.state_dir / "state" / "eval" / f"{kind}-{t0:%Y%m%d-%H%M%S}"
    meta = {
        "data": str(data), "passages": len(passages), "seed": seed, "from_version": from_version,
        "policy": policy_label, "model": cfg.model.base, "started": t0.isoformat(timespec="seconds"),
        "title": f"seal-agent eval {kind}: {len(passages)} passages of {data.name}, {cfg.model.base}",
        "executor": "local" if pool is None else "ray", "per_worker": run.per_worker,
    }
    if pool is not None:
        meta["cases"] = run.workers
    return Ladder(run, data, len(passages), judge is not None, write_outputs(run, out_dir, meta))
