"""What a version knows, asked the one way every caller asks it.

A version's knowledge is its weights (the live model) plus its routing table
(the modules it routes to). `ask`, the API, the daemon, `eval continual`,
`replay check` and consolidation's checks all answer through `Knowledge`: each
question is routed (memory/modules.py), the questions routed to one module are
answered together with that module merged in (`applied`: the weights are bit
for bit the same afterwards), the rest by the weights alone. A version with no
modules (every version of the merge line) routes nothing and answers as the
plain model.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..config import Config
from ..model.inner_loop import applied
from ..model.loader import answer_dtype
from ..qa import answering as qa_mod
from .embedding import Embedder
from .modules import ModuleStore, Route, Router
from .state import State

T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    text: str
    route: Route


def routed_modules(state: State, version: int) -> list[int]:
    row = state.version(version)
    return list(row.stats.get("routed", [])) if row is not None else []


def by_module(model, store: ModuleStore, routes: Sequence[Route], items: Sequence,
              run: Callable[[object, list], list[T]]) -> list[T]:
    """`run(model, items)` once per module the items are routed to (with it
    applied) and once for the unrouted ones; results in the items' order."""
    out: list[T | None] = [None] * len(items)
    groups: dict[int | None, list[int]] = {}
    for i, r in enumerate(routes):
        groups.setdefault(r.module, []).append(i)
    for module, where in sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        chosen = [items[i] for i in where]
        if module is None:
            results = run(model, chosen)
        else:
            with applied(model, store.path(module)) as with_module:
                results = run(with_module, chosen)
        for i, r in zip(where, results):
            out[i] = r
    return out  # type: ignore[return-value]


class Knowledge:
    """The live version's weights and routing table, answering questions."""

    def __init__(self, cfg: Config, state: State, store: ModuleStore, embedder: Callable[[], Embedder]):
        self.cfg, self.state, self.store = cfg, state, store
        self._embedder_factory = embedder
        self._embedder: Embedder | None = None
        self._router: tuple[tuple[int, ...], Router] | None = None
        self._lock = threading.Lock()  # the API's threads and the learner's route through one router
        self._texts: dict[int, str] = {}  # module -> its passages (they never change)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = self._embedder_factory()
        return self._embedder

    def router(self, version: int) -> Router:
        """The router over `version`'s routing table (rebuilt when the table changes)."""
        routed = tuple(routed_modules(self.state, version))
        if self._router is None or self._router[0] != routed:
            if routed:
                router = Router.over(self.store, self.embedder, routed, self.cfg.memory.route_threshold,
                                     self.cfg.memory.lexical_weight)
            else:  # nothing to route to: no embedding model needed
                router = _NoRoutes()
            self._router = (routed, router)
        return self._router[1]

    def dropped(self, old: int, new: int) -> list[int]:
        """The modules `old` routes to and `new` does not (a rollback, a consolidation that absorbed them)."""
        return sorted(set(routed_modules(self.state, old)) - set(routed_modules(self.state, new)))

    def route(self, version: int, texts: list[str]) -> list[Route]:
        with self._lock:
            return self.router(version).route(texts)

    def used(self, route: Route) -> list[dict]:
        """The modules an answer used, as a user is shown them (empty: the weights alone)."""
        if route.module is None:
            return []
        module = self.store.get(route.module)
        doc = self.state.document(module.document_id) if module and module.document_id is not None else None
        why = {k: round(v, 4) for k, v in (("similarity", route.similarity), ("overlap", route.overlap))
               if v is not None}
        mem = self.cfg.memory
        return [{"module": route.module, "score": round(route.score, 4), **why,
                 "merged": mem.apply_modules, "passage_in_prompt": mem.with_passage,
                 "document": doc["path"] if doc else None, "title": doc["title"] if doc else None}]

    def route_questions(self, version: int, questions: list[qa_mod.Question]) -> list[Route]:
        """Questions are routed as the model is asked them (`qa.question_template`)."""
        return self.route(version, [qa_mod.question_text(q, self.cfg.qa) for q in questions])

    def passage(self, module: int) -> str:
        """The passages a module learned, as `memory.with_passage` puts them in the prompt."""
        with self._lock:
            if module not in self._texts:
                found = self.store.get(module)
                self._texts[module] = "\n\n".join(text for _, text in self.store.passages(found)) if found else ""
            return self._texts[module]

    def passage_prefix(self, route: Route) -> str:
        """What `memory.with_passage` puts before a routed request (the API's path; "" when nothing)."""
        if not self.cfg.memory.with_passage or route.module is None:
            return ""
        return self.cfg.qa.context_template.format(title="", passage=self.passage(route.module))

    def applies(self, route: Route) -> int | None:
        """The module merged in for `route` (None with `memory.apply_modules` off)."""
        return route.module if self.cfg.memory.apply_modules else None

    def _grouped(self, model, routes: list[Route], questions: list[qa_mod.Question],
                 run: Callable[[object, list[qa_mod.Question], bool], list[T]]) -> list[T]:
        """`run(model, questions, in_context)` per module, as `memory` says: the
        module applied (apply_modules) and its passage in the prompt (with_passage)."""
        mem = self.cfg.memory
        if mem.with_passage:
            questions = [dataclasses.replace(q, context=self.passage(r.module)) if r.module is not None else q
                         for q, r in zip(questions, routes)]
        applying = [Route(self.applies(r), r.score) for r in routes]
        in_context = [mem.with_passage and r.module is not None for r in routes]
        return by_module(model, self.store, applying, list(zip(questions, in_context)),
                         lambda m, items: _by_context(m, items, run))

    def evaluate(self, model, tokenizer, version: int, questions: list[qa_mod.Question], *,
                 until_correct: bool = False) -> tuple[list[qa_mod.Scored], list[Route]]:
        routes = self.route_questions(version, questions)

        def run(m, qs: list[qa_mod.Question], in_context: bool) -> list[qa_mod.Scored]:
            return qa_mod.evaluate(m, tokenizer, qs, self.cfg.qa, use_chat=self.cfg.model.use_chat_template,
                                   compute_dtype=answer_dtype(self.cfg), until_correct=until_correct,
                                   in_context=in_context)

        return self._grouped(model, routes, questions, run), routes

    def answer(self, model, tokenizer, version: int, questions: list[qa_mod.Question],
               max_new_tokens: int | None = None) -> list[Answer]:
        routes = self.route_questions(version, questions)

        def run(m, qs: list[qa_mod.Question], in_context: bool) -> list[str]:
            return qa_mod.answer(m, tokenizer, qs, self.cfg.qa, use_chat=self.cfg.model.use_chat_template,
                                 compute_dtype=answer_dtype(self.cfg), max_new_tokens=max_new_tokens,
                                 in_context=in_context)

        texts = self._grouped(model, routes, questions, run)
        return [Answer(t, r) for t, r in zip(texts, routes)]


def _by_context(model, items: list[tuple[qa_mod.Question, bool]], run) -> list:
    """`run` once for the questions asked with their passage and once for the others, in order."""
    out: list = [None] * len(items)
    for in_context in (False, True):
        where = [i for i, (_, c) in enumerate(items) if c == in_context]
        if where:
            for i, r in zip(where, run(model, [items[i][0] for i in where], in_context)):
                out[i] = r
    return out


class _NoRoutes:
    """The router of a version that routes to no module."""

    modules = 0

    def route(self, texts: list[str]) -> list[Route]:
        return [Route(None, -1.0) for _ in texts]
