"""Grading an answer against a gold answer.

Offline graders (pure functions): normalized exact match, token F1, and
"normalized gold contained in the answer". Normalization is SQuAD's: lower
case, no punctuation, no articles, single spaces. The optional LLM judge asks
any OpenAI-compatible endpoint the SEAL paper's yes/no question.
"""

from __future__ import annotations

import os
import re
import string
from collections import Counter

from ..config import JudgeConfig, QAConfig
from ..errors import SealError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "“", "”", "–", "—"}


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def token_f1(prediction: str, gold: str) -> float:
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, gold: str) -> bool:
    """Gold (normalized) occurs in the prediction (normalized) on word boundaries."""
    g = normalize_answer(gold)
    p = normalize_answer(prediction)
    if not g:
        return False
    return f" {g} " in f" {p} "


def grade(prediction: str, gold: str, cfg: QAConfig) -> bool:
    if cfg.grader == "exact":
        return exact_match(prediction, gold)
    if cfg.grader == "f1":
        return token_f1(prediction, gold) >= cfg.f1_threshold
    return contains(prediction, gold)


def settled(partial: str, gold: str, cfg: QAConfig) -> bool:
    """Whether an answer still being written is graded correct whatever comes
    next: with the `contains` grader, once the gold is among its finished words
    (those followed by a space or punctuation; the last word may still grow,
    "Paris" into "Parisian"). Never for `exact` and `f1`, which later words change."""
    if cfg.grader != "contains":
        return False
    cut = max((i for i, ch in enumerate(partial) if ch.isspace() or ch in _PUNCT), default=-1)
    return cut > 0 and contains(partial[:cut], gold)


# -- LLM judge -----------------------------------------------------------

JUDGE_PROMPT = (
    "You are a grading assistant. Your job is to determine whether a student's answer correctly "
    "answers the question based solely on the provided gold answer. Do not use any outside knowledge. "
    "The student answer can include additional information, but it must at least fully convey the gold "
    "answer and must not contradict it. Ignore style, phrasing, or extra details that do not affect "
    "correctness. Respond ONLY with 'yes' or 'no'.\n\n"
    "Question: {question}\nGold answer: {gold}\nStudent answer: {pred}\n"
    "Is the student answer correct based solely on the gold answer? Respond 'yes' or 'no'."
)
_YES = re.compile(r"\byes\b", re.IGNORECASE)
_NO = re.compile(r"\bno\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool:
    """Yes only when the reply says yes and does not say no."""
    return bool(_YES.search(text or "")) and not _NO.search(text or "")


class Judge:
    """The paper's yes/no grader through any OpenAI-compatible chat endpoint."""

    def __init__(self, cfg: JudgeConfig):
        if not cfg.base_url:
            raise SealError("no judge configured: set judge.base_url (and the key in $" + cfg.api_key_env + ")")
        from openai import OpenAI

        self.cfg = cfg
        self.client = OpenAI(
            base_url=cfg.base_url,
            api_key=os.environ.get(cfg.api_key_env) or "none",
            timeout=cfg.timeout_s,
        )

    def grade(self, question: str, gold: str, prediction: str) -> bool:
        if not prediction.strip():
            return False
        prompt = JUDGE_PROMPT.format(question=question, gold=gold, pred=prediction.strip())
        reply = self.client.chat.completions.create(
            model=self.cfg.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0.0,
            max_tokens=4,
        )
        return parse_yes_no(reply.choices[0].message.content or "")
