"""Questions for a passage that carries none: answers picked from the passage, questions by the model.

A small model asked for question-answer pairs invents facts and whole new
passages, so the answers are chosen here, from the passage itself: names,
numbers and dates (`answer_spans`, pure). For each, a question is made as
policies/qa-gen.toml says: "cloze" (the default; the sentence holding the
answer with the answer blanked out, which SmolLM2-135M cannot get wrong) or
"model" (the model writes one, `{answer}` in its prompt; for larger models).
A pair is kept only when
  1. the question is a question and does not contain its answer, and
  2. the current model answers it correctly with the passage in context (a
     question the model cannot answer even while reading the passage tests
     nothing it could learn).
The text logic is pure; `generate_qas` runs the model for the writing and for
check 2, for several passages in one batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import QAConfig
from ..documents import Passage
from ..model.generation import generate
from ..model.precision import Precision
from ..policy import FUNCTION_WORDS, Policy
from .answering import Question, evaluate
from .grading import normalize_answer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# Capitalized word runs ("William the Conqueror", "Battle of Hastings") and numbers.
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_DATE = re.compile(rf"{_MONTH}\s+\d{{1,2}}(?:,\s*\d{{4}})?|\d{{1,2}}\s+{_MONTH}(?:\s+\d{{4}})?|{_MONTH}\s+\d{{4}}")
_NAME = re.compile(r"[A-Z][\w-]*(?:\s+(?:(?:of|the|de|du|da|von|van|la|le|al)\s+)*[A-Z][\w-]*)*")
_NUMBER = re.compile(r"\b\d[\d,]*(?:\.\d+)?(?:st|nd|rd|th)?(?:\s*(?:%|percent|million|billion|thousand))?")
_QUESTION_PREFIX = re.compile(r"^\s*(?:\*\*)?(?:question|q)\s*\d*\s*[:.]\s*(?:\*\*)?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class GeneratedQAs:
    generated: int  # questions the model wrote
    grounded: int  # of which are real questions not giving their answer away
    kept: list[tuple[str, str]]  # of which the model answers correctly in context


def sentences(text: str) -> list[str]:
    """Sentences, never across lines (a heading is not part of the next sentence)."""
    out = []
    for line in text.splitlines():
        out.extend(s.strip() for s in _SENTENCE_END.split(" ".join(line.split())) if s.strip())
    return out


def answer_spans(text: str, title: str = "", limit: int = 16) -> list[tuple[str, str]]:
    """(answer, its sentence): names, dates and numbers of the passage, spread
    over its sentences (round robin), no repeats. A lone capitalized word that
    starts a sentence ("Through", "The") is not taken for a name; the title is
    what every question is about, so it is not an answer."""
    per_sentence = []
    seen = {normalize_answer(title)} if title else set()
    for sentence in sentences(text):
        spans, taken = [], []  # dates first, then names, then numbers; no overlaps
        matches = [*_DATE.finditer(sentence), *_NAME.finditer(sentence), *_NUMBER.finditer(sentence)]
        for m in matches:
            if any(m.start() < end and start < m.end() for start, end in taken):
                continue
            span = m.group().strip(" ,.")
            words = span.split()
            if not span or (len(words) == 1 and (span.lower() in FUNCTION_WORDS
                                                 or (m.start() == 0 and not span[0].isdigit()))):
                continue
            if words[0].lower() in FUNCTION_WORDS and len(words) > 1:
                span = " ".join(words[1:])  # "The Normans" at a sentence start -> "Normans"
            key = normalize_answer(span)
            if key and key not in seen:
                taken.append((m.start(), m.end()))
                seen.add(key)
                spans.append((span, sentence))
        per_sentence.append(spans)
    out: list[tuple[str, str]] = []
    while len(out) < limit and any(per_sentence):
        for spans in per_sentence:
            if spans and len(out) < limit:
                out.append(spans.pop(0))
    return out


def cloze(sentence: str, answer: str) -> str:
    """The sentence with its answer blanked out."""
    return sentence.replace(answer, "___", 1)


def clean_question(text: str) -> str:
    """The first line of the model's reply, without a "Question:" label."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    return _QUESTION_PREFIX.sub("", lines[0]).strip().strip('"').strip()


def usable(question: str, answer: str) -> bool:
    """A question (ends in '?', or a fill-in-the-blank) of a few words that does not contain its answer."""
    q = normalize_answer(question)
    return ((question.endswith("?") or "___" in question) and 3 <= len(q.split()) <= 80
            and f" {normalize_answer(answer)} " not in f" {q} ")


def generate_qas(model, tokenizer, policy: Policy, passages: list[Passage], qa_cfg: QAConfig, *, use_chat: bool,
                 dtype: Precision, seed: int, max_qas: int) -> list[GeneratedQAs]:
    """QAs for each passage; the model's writing (mode "model") and its in-context
    answers of every passage's candidates run batched together."""
    rules = policy.questions
    spans = [answer_spans(p.text, p.title, limit=max_qas + max_qas // 2) for p in passages]
    if rules.mode == "cloze":
        pairs = [[(rules.cloze_template.format(title=p.title, passage=p.text, answer="", cloze=cloze(sentence, a)), a)
                  for a, sentence in ps] for p, ps in zip(passages, spans)]
    else:
        prompts = [policy.prompt(tokenizer, p.title, p.text, use_chat, answer=a)
                   for p, ps in zip(passages, spans) for a, _ in ps]
        replies = iter(generate(model, tokenizer, prompts, policy.sampling, compute_dtype=dtype, seed=seed,
                                batch_size=qa_cfg.batch_size))
        pairs = [[(clean_question(next(replies)), a) for a, _ in ps] for ps in spans]
    written = [[(q, a) for q, a in ps if q] for ps in pairs]
    candidates = [[(q, a) for q, a in ws if usable(q, a)] for ws in written]
    questions = [Question(q, a, p.title, p.text) for p, cs in zip(passages, candidates) for q, a in cs]
    scored = iter(evaluate(model, tokenizer, questions, qa_cfg, use_chat=use_chat, compute_dtype=dtype,
                           in_context=True, until_correct=True))
    out = []
    for ws, cs in zip(written, candidates):
        mine = [next(scored) for _ in cs]
        kept = [(s.question.question, s.question.answer) for s in mine if s.correct][:max_qas]
        out.append(GeneratedQAs(len(ws), len(cs), kept))
    return out
