"""How much of a question's wording a module's passages contain.

The router's second signal beside the embedding (memory/modules.py). A
sentence embedding places a question near every passage of its article; which
passage it is about shows in its rarer words: names, numbers, terms. Overlap is
the share of the question's terms, each weighted by its inverse document
frequency over the routed modules' passages, that a module's passages contain.
A term no routed passage contains weighs as much as the rarest one: a question
about something never learned keeps a low overlap with every module. A
module's title words are left out of its score: every passage of the article
shares them, so they say nothing about which passage a question is about (and
the question template names the title anyway).
Tokenizing, stop words and the IDF are scikit-learn's (TfidfVectorizer).
"""

from __future__ import annotations

from collections.abc import Mapping

from sklearn.feature_extraction.text import TfidfVectorizer


class Overlap:
    """IDF-weighted share of a query's terms found in each module's text."""

    def __init__(self, texts: Mapping[int, str], titles: Mapping[int, str] | None = None):
        self._terms: dict[int, frozenset[str]] = {}
        self._title_terms: dict[int, frozenset[str]] = {}
        self._idf: dict[str, float] = {}
        self._unseen = 1.0
        if not texts:
            return
        vec = TfidfVectorizer(stop_words="english")
        try:
            vec.fit(list(texts.values()))
        except ValueError:  # only stop words: nothing to weigh
            return
        self._analyze = vec.build_analyzer()
        self._idf = {t: float(vec.idf_[i]) for t, i in vec.vocabulary_.items()}
        self._unseen = max(self._idf.values())
        self._terms = {m: frozenset(self._analyze(t)) for m, t in texts.items()}
        self._title_terms = {m: frozenset(self._analyze(t)) for m, t in (titles or {}).items()}

    def terms(self, query: str) -> dict[str, float]:
        """The query's terms and their weights."""
        if not self._idf:
            return {}
        return {t: self._idf.get(t, self._unseen) for t in set(self._analyze(query))}

    def score(self, terms: Mapping[str, float], module: int) -> float:
        """Share (0..1) of the terms' weight that `module`'s text contains (its title's terms left out)."""
        title = self._title_terms.get(module, frozenset())
        own = {t: w for t, w in terms.items() if t not in title}
        total = sum(own.values())
        have = self._terms.get(module)
        if not total or not have:
            return 0.0
        return sum(w for t, w in own.items() if t in have) / total
