"""Asking the model questions and scoring its answers (no passage in context)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import QAConfig
from .documents import QA
from .grading import grade
from .model.generation import Sampling, generate, render_prompt


@dataclass(frozen=True)
class Question:
    """A question about a passage, with its gold answer."""

    question: str
    answer: str
    title: str = ""


@dataclass
class Scored:
    question: Question
    prediction: str
    correct: bool


def questions_of(title: str, qas: list[QA]) -> list[Question]:
    return [Question(q.question, q.answer, title) for q in qas]


def question_prompt(tokenizer, question: str, title: str, cfg: QAConfig, use_chat: bool) -> str:
    text = cfg.question_template.format(title=title, question=question) if title else question
    return render_prompt(
        tokenizer,
        system=cfg.system,
        user=text,
        base=cfg.base_template.format(question=text),
        use_chat=use_chat,
    )


def answer(
    model, tokenizer, questions: list[str], titles: list[str], cfg: QAConfig, *,
    use_chat: bool, compute_dtype: torch.dtype, max_new_tokens: int | None = None,
) -> list[str]:
    """Greedy answers to questions, batched."""
    prompts = [question_prompt(tokenizer, q, t, cfg, use_chat) for q, t in zip(questions, titles)]
    sampling = Sampling(max_new_tokens=max_new_tokens or cfg.max_new_tokens, temperature=0.0)
    return generate(model, tokenizer, prompts, sampling, compute_dtype=compute_dtype, batch_size=cfg.batch_size)


def evaluate(
    model, tokenizer, questions: list[Question], cfg: QAConfig, *, use_chat: bool, compute_dtype: torch.dtype
) -> list[Scored]:
    if not questions:
        return []
    preds = answer(
        model, tokenizer, [q.question for q in questions], [q.title for q in questions], cfg,
        use_chat=use_chat, compute_dtype=compute_dtype,
    )
    return [Scored(q, p, grade(p, q.answer, cfg)) for q, p in zip(questions, preds)]


def accuracy(scored: list[Scored]) -> float | None:
    return sum(s.correct for s in scored) / len(scored) if scored else None
