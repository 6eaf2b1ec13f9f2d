"""Asking the model questions and scoring its answers (no passage in context)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import QAConfig
from ..documents import QA
from ..model.generation import Sampling, generate, render_prompt
from ..model.precision import Precision
from .grading import grade, settled


@dataclass(frozen=True)
class Question:
    """A question about a passage, with its gold answer. `context` (the passage)
    is put in the prompt only when answering in context."""

    question: str
    answer: str
    title: str = ""
    context: str = ""


@dataclass
class Scored:
    question: Question
    prediction: str
    correct: bool


def questions_of(title: str, qas: list[QA], context: str = "") -> list[Question]:
    return [Question(q.question, q.answer, title, context) for q in qas]


def question_text(q: Question, cfg: QAConfig) -> str:
    """The question as the model is asked it (`qa.question_template`), and as a judge is shown it."""
    return cfg.question_template.format(title=q.title, question=q.question) if q.title else q.question


def question_prompt(tokenizer, q: Question, cfg: QAConfig, use_chat: bool, in_context: bool = False) -> str:
    text = question_text(q, cfg)
    if in_context:
        text = cfg.context_template.format(title=q.title, passage=q.context) + text
    return render_prompt(
        tokenizer,
        system=cfg.system,
        user=text,
        base=cfg.base_template.format(question=text),
        use_chat=use_chat,
    )


def answer(
    model, tokenizer, questions: list[Question], cfg: QAConfig, *, use_chat: bool, compute_dtype: Precision,
    in_context: bool = False, max_new_tokens: int | None = None, until_correct: bool = False,
) -> list[str]:
    """Greedy answers to questions, batched. In context, the questions about one
    passage share the passage's keys and values (computed once per batch).
    `until_correct`: an answer stops as soon as the grader settles it correct
    (`grading.settled`), and its batch goes on without it."""
    prompts = [question_prompt(tokenizer, q, cfg, use_chat, in_context) for q in questions]
    sampling = Sampling(max_new_tokens=max_new_tokens or cfg.max_new_tokens, temperature=0.0)
    groups = [(q.title, q.context) for q in questions] if in_context else None
    done = (lambda i, text: settled(text, questions[i].answer, cfg)) if until_correct else None
    return generate(model, tokenizer, prompts, sampling, compute_dtype=compute_dtype, batch_size=cfg.batch_size,
                    groups=groups, done=done)


def evaluate(
    model, tokenizer, questions: list[Question], cfg: QAConfig, *, use_chat: bool, compute_dtype: Precision,
    in_context: bool = False, until_correct: bool = False,
) -> list[Scored]:
    """Answer and grade (offline grader) each question. `until_correct`: where
    only the grade matters, a correct answer ends where the gold is settled
    (same grades as whole answers with the `contains` grader; a prediction is
    then cut short after its gold)."""
    if not questions:
        return []
    preds = answer(model, tokenizer, questions, cfg, use_chat=use_chat, compute_dtype=compute_dtype,
                   in_context=in_context, until_correct=until_correct)
    return [Scored(q, p, grade(p, q.answer, cfg)) for q, p in zip(questions, preds)]


def accuracy(scored: list[Scored]) -> float | None:
    return sum(s.correct for s in scored) / len(scored) if scored else None
