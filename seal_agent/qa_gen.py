"""Questions for a passage that carries none: the model writes them, grounding keeps the good ones.

A small model invents freely, so a generated pair is kept only when
  1. its answer is short and occurs (normalized) in the passage, and
  2. the current model answers its question correctly with the passage in
     context (a question the model cannot answer even while reading the
     passage tests nothing it could learn).
The parsing and the lexical filter are pure functions; `generate_qas` runs the
model for the writing and for check 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import QAConfig
from .documents import Passage
from .grading import normalize_answer
from .model.generation import generate
from .policy import Policy, split_items
from .qa import Question, evaluate

_PAIR = re.compile(
    r"^\s*(?:\d+[.)]\s*)?(?:\*\*)?(?:Question|Q)\s*\d*\s*[:.]\s*(?:\*\*)?\s*(?P<q>.+?)\s*"
    r"(?:\*\*)?(?:Answer|A)\s*\d*\s*[:.]\s*(?:\*\*)?\s*(?P<a>.+?)\s*$",
    re.DOTALL,
)
MAX_ANSWER_WORDS = 10


@dataclass(frozen=True)
class GeneratedQAs:
    generated: int  # pairs parsed from the model's text
    grounded: int  # of which the answer occurs in the passage
    kept: list[tuple[str, str]]  # of which the model answers correctly in context
    text: str  # what the model wrote


def parse_pairs(items: list[str]) -> list[tuple[str, str]]:
    """(question, answer) from "Question N: ... Answer: ..." items; others are skipped."""
    pairs = []
    for item in items:
        m = _PAIR.match(item)
        if not m:
            continue
        q = " ".join(m["q"].split())
        a = " ".join(m["a"].splitlines()[0].split()).strip("*").strip()
        if q and a:
            pairs.append((q, a))
    return pairs


def grounded(pairs: list[tuple[str, str]], passage: str) -> list[tuple[str, str]]:
    """Pairs whose short answer occurs in the passage (normalized, on word
    boundaries) and does not just repeat the question; duplicates dropped."""
    text = f" {normalize_answer(passage)} "
    seen, out = set(), []
    for q, a in pairs:
        na = normalize_answer(a)
        if not na or len(na.split()) > MAX_ANSWER_WORDS or f" {na} " not in text:
            continue
        if f" {na} " in f" {normalize_answer(q)} ":
            continue  # the question gives its answer away
        key = normalize_answer(q)
        if key in seen:
            continue
        seen.add(key)
        out.append((q, a))
    return out


def generate_qas(model, tokenizer, policy: Policy, passage: Passage, qa_cfg: QAConfig, *, use_chat: bool,
                 dtype: torch.dtype, seed: int, max_qas: int) -> GeneratedQAs:
    prompt = policy.prompt(tokenizer, passage.title, passage.text, use_chat)
    [completion] = generate(model, tokenizer, [prompt], policy.sampling, compute_dtype=dtype, seed=seed)
    text = policy.completion_text(tokenizer, completion, use_chat)
    pairs = parse_pairs(split_items(text, policy.parse))
    candidates = grounded(pairs, passage.text)
    questions = [Question(q, a, passage.title, passage.text) for q, a in candidates]
    scored = evaluate(model, tokenizer, questions, qa_cfg, use_chat=use_chat, compute_dtype=dtype,
                      in_context=True)
    kept = [(s.question.question, s.question.answer) for s in scored if s.correct][:max_qas]
    return GeneratedQAs(len(pairs), len(candidates), kept, text)
