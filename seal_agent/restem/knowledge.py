"""Knowledge incorporation as a ReSTEM domain (the paper's first domain).

A context is a passage with questions (gold ones from a SQuAD-style file, or
the replay bank's gold and grounded generated ones). A self-edit is the
policy's completion for the passage; applying it is the inner loop on its
items plus the passage; the score is no-context accuracy on the passage's
questions; forgetting is measured on the replay QAs nearest to the passage.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..documents import Passage
from ..errors import SealError
from ..learning.self_edit import SelfEdit, parse, sample
from ..memory.replay import ReplayBank
from ..memory.state import State
from ..model.inner_loop import train_adapter
from ..model.loader import compute_dtypes
from ..policy import Policy, ungrounded_terms
from ..qa import answering as qa_mod
from ..qa.grading import contains


@dataclass(frozen=True)
class KnowledgeContext:
    id: str  # the passage's content hash
    title: str
    text: str
    questions: tuple[qa_mod.Question, ...]
    source: str  # bank | file name
    recency: int = 0  # the version that learned it (bank); 0 for file passages

    @property
    def passage(self) -> Passage:
        return Passage(title=self.title, text=self.text)


def bank_contexts(state: State, bank: ReplayBank, lineage: list[int], max_questions: int) -> list[KnowledgeContext]:
    """Passages the live model has learned, with their replay QAs (gold or grounded generated)."""
    by_passage: dict[str, list] = {}
    for q in bank.active(lineage):
        by_passage.setdefault(q.passage_hash, []).append(q)
    out = []
    for h, qas in by_passage.items():
        row = state.passage(h)
        if row is None:
            continue
        out.append(KnowledgeContext(h, row["title"], row["text"],
                                    tuple(q.as_question() for q in qas[:max_questions]), "bank",
                                    max(q.version for q in qas)))
    out.sort(key=lambda c: -c.recency)
    return out


def file_contexts(passages: list[Passage], source: str, max_questions: int) -> list[KnowledgeContext]:
    return [KnowledgeContext(p.hash, p.title, p.text,
                             tuple(qa_mod.questions_of(p.title, p.questions[:max_questions])), source)
            for p in passages if p.questions]


class KnowledgeDomain:
    name = "knowledge"

    def __init__(self, cfg: Config, tokenizer, policy: Policy, bank: ReplayBank | None = None,
                 lineage: list[int] | None = None, live_version: int = 0):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.policy = policy
        self.bank = bank
        self.lineage = lineage or []
        self.live_version = live_version
        self.use_chat = cfg.model.use_chat_template
        self.dtypes = compute_dtypes(cfg)
        self._replay_before: dict[str, list] = {}  # per context: nearby replay QAs `model` answers right

    def portable(self) -> KnowledgeDomain:
        """This domain as a worker of a pool gets it: without the replay bank (a
        database and an index of this machine), so without the retention penalty."""
        if self.cfg.restem.retention_penalty > 0:
            raise SealError("restem.retention_penalty needs the replay bank, which the workers of a cluster do "
                            'not have: set it to 0, or cluster.executor = "local"')
        other = copy.copy(self)
        other.bank, other._replay_before = None, {}
        return other

    def prompt(self, ctx: KnowledgeContext) -> str:
        return self.policy.prompt(self.tokenizer, ctx.title, ctx.text, self.use_chat)

    def sample(self, model, ctx: KnowledgeContext, k: int, seed: int) -> list[str]:
        return sample(model, self.tokenizer, self.policy, self.prompt(ctx), k, self.dtypes.generate, seed)

    def parse(self, ctx: KnowledgeContext, completion: str) -> SelfEdit:
        return parse(self.policy, self.tokenizer, ctx.passage, self.prompt(ctx), completion, self.use_chat)

    @contextlib.contextmanager
    def apply(self, model, update: SelfEdit, seed: int) -> Iterator[Any]:
        candidate, _stats = train_adapter(model, self.tokenizer, update.examples, self.cfg.lora, self.cfg.train,
                                          seed=seed, compute_dtype=self.dtypes.train)
        try:
            yield candidate
        finally:
            candidate.unload()

    def _scored(self, model, questions) -> list[qa_mod.Scored]:
        return qa_mod.evaluate(model, self.tokenizer, list(questions), self.cfg.qa, use_chat=self.use_chat,
                               compute_dtype=self.dtypes.answer)

    def score(self, model, ctx: KnowledgeContext) -> float:
        return qa_mod.accuracy(self._scored(model, ctx.questions)) or 0.0

    def forgetting(self, model, candidate, ctx: KnowledgeContext) -> float | None:
        """Of the replay QAs nearest to the passage that `model` answers right, the share `candidate` gets wrong."""
        if self.bank is None:
            return None
        if ctx.id not in self._replay_before:
            nearest, _ = self.bank.replay_sample(ctx.text, self.lineage, self.cfg.restem.replay_k, 0, ctx.id)
            # `model` holds the live version's weights: its answers are the live version's.
            right = self.bank.correctness(self.live_version, nearest,
                                          lambda qas: self._scored(model, [q.as_question() for q in qas]))
            self._replay_before[ctx.id] = [q for q in nearest if right[q.id]]
        known = self._replay_before[ctx.id]
        if not known:
            return None
        after = self._scored(candidate, [q.as_question() for q in known])
        return sum(not s.correct for s in after) / len(known)

    def proxy(self, ctx: KnowledgeContext, completion: str) -> float:
        """Share of the passage's answers the self-edit's items state, times the
        share of its items that name nothing the passage does not."""
        items = self.policy.items(completion)
        if not items or not ctx.questions:
            return 0.0
        text = "\n".join(items)
        coverage = sum(contains(text, q.answer) for q in ctx.questions) / len(ctx.questions)
        source = f"{ctx.title}\n{ctx.text}"
        grounded = sum(not ungrounded_terms(it, source) for it in items) / len(items)
        return coverage * grounded

    def describe(self, ctx: KnowledgeContext, completion: str) -> dict[str, Any]:
        return {"chars": len(completion), "items": len(self.policy.items(completion)), "text": completion}
