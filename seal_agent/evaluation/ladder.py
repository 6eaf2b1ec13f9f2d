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

from ..config import Config
from ..documents import Passage, read_qa_passages
from ..errors import SealError
from ..learning.self_edit import from_text, write_self_edits
from ..model.inner_loop import Example, train_adapter
from ..model.loader import compute_dtypes
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
        if self.judge_correct is not None:
            out["judge_accuracy"] = round(self.judge_correct / self.n, 4) if self.n else 0.0
        return out


@dataclass
class EvalRun:
    kind: str  # squad | cpt
    conditions: list[str]
    results: dict[str, ConditionResult] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)

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

    # -- the two settings ------------------------------------------------
    def squad(self, passages: list[Passage], conditions: list[str], progress: Progress) -> EvalRun:
        run = EvalRun("squad", conditions)
        for index, passage in enumerate(passages):
            progress("passage", {"index": index, "total": len(passages), "title": passage.title})
            for condition in conditions:
                t0 = time.perf_counter()
                if condition in (BASE, IN_CONTEXT):
                    records, train = self.answer(self.model, [(index, passage)], condition), (0.0, 0)
                else:
                    examples = self.training_data(condition, passage, index)
                    records, secs, toks = self.updated_answers(examples, [(index, passage)], condition,
                                                               seed=self.seed + index)
                    train = (secs, toks)
                run.add(condition, records, time.perf_counter() - t0, train)
                progress("condition", {"index": index, "condition": condition,
                                       "correct": sum(r.correct for r in records), "n": len(records)})
        return run

    def cpt(self, passages: list[Passage], conditions: list[str], progress: Progress) -> EvalRun:
        run = EvalRun("cpt", conditions)
        indexed = list(enumerate(passages))
        for condition in conditions:
            progress("condition-start", {"condition": condition})
            t0 = time.perf_counter()
            if condition == BASE:
                records, train = self.answer(self.model, indexed, condition), (0.0, 0)
            else:
                examples = [ex for i, p in indexed for ex in self.training_data(condition, p, i)]
                records, secs, toks = self.updated_answers(examples, indexed, condition, seed=self.seed)
                train = (secs, toks)
            run.add(condition, records, time.perf_counter() - t0, train, passages=len(passages))
            progress("condition", {"condition": condition, "correct": sum(r.correct for r in records),
                                   "n": len(records)})
        return run


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
             policy_adapter: Path | None = None) -> EvalRun:
    torch.manual_seed(seed)
    evaluator = Evaluator(cfg, model, tokenizer, policy, judge=judge, seed=seed, policy_adapter=policy_adapter)
    if kind == "cpt":
        return evaluator.cpt(passages, conditions, progress)
    return evaluator.squad(passages, conditions, progress)


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
    run = run_eval(kind, cfg, model, tokenizer, agent.policy, passages, conds, judge=judge, seed=seed,
                   progress=progress, policy_adapter=adapter)
    out_dir = out_dir or cfg.state_dir / "state" / "eval" / f"{kind}-{t0:%Y%m%d-%H%M%S}"
    meta = {
        "data": str(data), "passages": len(passages), "seed": seed, "from_version": from_version,
        "policy": policy_label, "model": cfg.model.base, "started": t0.isoformat(timespec="seconds"),
        "title": f"seal-agent eval {kind}: {len(passages)} passages of {data.name}, {cfg.model.base}",
    }
    return Ladder(run, data, len(passages), judge is not None, write_outputs(run, out_dir, meta))
