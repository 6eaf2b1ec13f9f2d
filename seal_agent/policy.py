"""Self-edit policies: how to ask for a self-edit and how to turn it into training data.

A policy is a TOML file in policies/ (see policies/README.md for the fields).
Loading validates every field and names the file and the field on error, so a
malformed policy stops the program at start-up, not halfway through learning.
Parsing a completion is pure string logic (no model), following the SEAL
reference: split on the separator, then on lines; drop a chatty preamble line;
keep numbered question-answer items whole; prefix each item with the title;
always add the raw passage as one more sequence.
"""

from __future__ import annotations

import re
import string
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PolicyError
from .model.generation import Sampling, has_chat_template, render_prompt
from .model.inner_loop import Example

PARSE_MODES = ("lines", "segments", "qa")
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•]|\(\w\))\s+")
# {answer}: only for question-writing policies (qa-gen), filled per answer span.
_PLACEHOLDERS = {"title", "passage", "answer"}


@dataclass(frozen=True)
class ParseRules:
    mode: str = "lines"  # lines | segments | qa
    separator: str = "---"
    drop_preamble: bool = True
    # qa mode: regex that starts a new question item.
    qa_item_start: str = r"(?:\d+[.)]\s*)?(?:\*\*)?(?:Question|Q)\s*\d*\s*[:.]"
    sequence_template: str = "{title}\n{item}"
    min_item_chars: int = 3
    max_items: int = 200
    # Drop items naming people, places or numbers that the passage does not
    # contain: a small model's hallucinations would otherwise be learned as facts.
    grounded_only: bool = False


QUESTION_MODES = ("cloze", "model")


@dataclass(frozen=True)
class QuestionRules:
    """For question-writing policies (qa-gen): how a question is made for an
    answer span chosen from the passage. "cloze": from the sentence holding the
    answer, the answer blanked out ({cloze}); "model": the model writes it from
    the chat/base prompt ({answer} in the prompt)."""

    mode: str = "model"
    cloze_template: str = 'Fill in the blank ({title}): "{cloze}"'


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    chat_system: str
    chat_user: str
    base_prompt: str
    # What the base prompt already said of the answer (the base self-qa prompt
    # ends in "Question 1: "); put back in front of a base-model completion.
    base_completion_prefix: str
    sampling: Sampling
    parse: ParseRules
    path: Path | None = None
    questions: QuestionRules = QuestionRules()

    def prompt(self, tokenizer, title: str, passage: str, use_chat: bool = True, answer: str = "") -> str:
        fields = {"title": title, "passage": passage, "answer": answer}
        return render_prompt(
            tokenizer,
            system=self.chat_system.format(**fields) if self.chat_system else None,
            user=self.chat_user.format(**fields),
            base=self.base_prompt.format(**fields),
            use_chat=use_chat,
        )

    def completion_text(self, tokenizer, completion: str, use_chat: bool = True) -> str:
        """The self-edit as the model meant it: a base-model completion gets back
        the words its prompt ended with."""
        if self.base_completion_prefix and not (use_chat and has_chat_template(tokenizer)):
            return self.base_completion_prefix + completion.lstrip()
        return completion

    def items(self, completion: str, title: str = "", passage: str | None = None) -> list[str]:
        """The self-edit's items (without title, without the passage). With the
        passage given and `grounded_only` on, ungrounded items are dropped."""
        items = split_items(completion, self.parse)
        if self.parse.grounded_only and passage is not None:
            items = [it for it in items if not ungrounded_terms(it, f"{title}\n{passage}")]
        return items

    def examples(self, completion: str, title: str, passage: str) -> list[Example]:
        """Training sequences: each item under the title, then the passage itself.
        The part of the template before {item} is the example's prompt."""
        before, after = self.parse.sequence_template.split("{item}", 1)
        prompt, suffix = before.format(title=title), after.format(title=title)
        items = self.items(completion, title, passage) + [passage.strip()]
        return [Example(prompt, item + suffix) for item in items]


def split_items(completion: str, rules: ParseRules) -> list[str]:
    text = completion.strip()
    if not text:
        return []
    if rules.mode == "qa" and re.search(rules.qa_item_start, text):
        items = _split_qa(text, rules.qa_item_start)
    else:
        segments = [s.strip() for s in text.split(rules.separator)] if rules.separator else [text]
        segments = [s for s in segments if s]
        if rules.mode == "segments":
            items = segments
        else:
            items = [ln.strip() for seg in segments for ln in seg.splitlines() if ln.strip()]
        if rules.drop_preamble:
            items = _drop_preamble(items)
    items = [it for it in items if len(_strip_markup(it)) >= rules.min_item_chars]
    return items[: rules.max_items]


_NAME_OR_NUMBER = re.compile(r"\b(?:[A-Z][\w'-]*|\d[\d,.]*\d|\d)\b")
# Words that are capitalized at times without naming anything: neither a name
# for the grounding check nor an answer for the questions written for a passage.
FUNCTION_WORDS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "he", "she", "they", "their", "his", "her",
    "in", "on", "at", "by", "for", "of", "to", "from", "with", "as", "and", "but", "or", "if", "when", "while",
    "there", "here", "what", "who", "which", "where", "why", "how", "some", "many", "most", "each", "both",
    "after", "before", "during", "since", "although", "because", "however", "also", "such", "we", "i", "you",
})
# What the grounding check never takes for a name: the function words, and the
# words and connectives self-edits are written with ("Question 1:", "Yes, ...",
# "Thus ..."). Those stay out of FUNCTION_WORDS: an answer span starting with
# one is often a real name ("No Child Left Behind", "One True God").
_NOT_NAMES = FUNCTION_WORDS | {
    "is", "are", "was", "were", "be", "not", "no", "yes", "all", "every", "one", "so", "thus", "therefore",
    "question", "answer", "implication", "implications", "passage", "overall", "additionally", "furthermore",
}


def ungrounded_terms(item: str, source: str) -> set[str]:
    """Names and numbers in `item` (capitalized words, digits) that `source` never mentions.
    List numbering ("3.") and capitalized function words do not count."""
    body = _LIST_ITEM.sub("", item, count=1)
    body = re.sub(r"^\s*(?:Question|Answer|Q|A)\s*\d*\s*[:.]", "", body)
    known = set(re.findall(r"[\w'-]+", source.lower()))
    known_digits = set(re.findall(r"\d[\d,.]*\d|\d", source))
    # The first word of a sentence is capitalized anyway: not evidence of a name.
    starts = {m.end() for m in re.finditer(r"(?:^|[.!?:;]\s+|\n)\W*(?=\w)", body)}
    missing = set()
    for m in _NAME_OR_NUMBER.finditer(body):
        term, word = m.group(), m.group().lower()
        if word in _NOT_NAMES or (term[0].isupper() and m.start() in starts):
            continue
        if term[0].isdigit():
            if term not in known_digits:
                missing.add(term)
        elif word not in known and word.rstrip("s") not in known and word.removesuffix("'s") not in known:
            missing.add(term)
    return missing


def _split_qa(text: str, item_start: str) -> list[str]:
    """Keep each numbered question with its answer as one item."""
    starts = [m.start() for m in re.finditer(rf"(?m)^\s*{item_start}", text)]
    if not starts:
        return [text]
    items = []
    if text[: starts[0]].strip() and not _is_preamble(text[: starts[0]].strip()):
        items.append(text[: starts[0]].strip())
    for a, b in zip(starts, starts[1:] + [len(text)]):
        item = text[a:b].strip()
        if item:
            items.append(item)
    return items


def _strip_markup(line: str) -> str:
    return line.strip().strip("*#_ ").strip()


def _is_preamble(line: str) -> bool:
    """A chatty or header line such as 'Sure, here are the implications:' or '**Implications:**'."""
    plain = _strip_markup(line)
    return plain.endswith(":") or plain.lower().startswith(("sure", "here are", "here is", "certainly"))


def _drop_preamble(items: list[str]) -> list[str]:
    """Drop one leading line that introduces the list rather than being part of it."""
    if len(items) > 1 and not _LIST_ITEM.match(items[0]) and (
        _LIST_ITEM.match(items[1]) or _is_preamble(items[0])
    ):
        return items[1:]
    if len(items) == 1 and _is_preamble(items[0]) and _strip_markup(items[0]).endswith(":"):
        return []
    return items


# -- loading -------------------------------------------------------------


def _field(data: dict, key: str, kind: type, path: Path, default: Any = ...) -> Any:
    section, _, name = key.rpartition(".")
    table = data
    for part in section.split(".") if section else []:
        table = table.get(part, {})
        if not isinstance(table, dict):
            raise PolicyError(f"{path}: [{part}] must be a table")
    if name not in table:
        if default is ...:
            raise PolicyError(f"{path}: missing field '{key}'")
        return default
    value = table[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PolicyError(f"{path}: field '{key}' must be {kind.__name__}, got {value!r}")
    return value


_KNOWN = {
    "": {"name", "description", "domain", "chat", "base", "sampling", "parse", "questions"},
    "questions": {"mode", "cloze_template"},
    "chat": {"system", "user"},
    "base": {"prompt", "completion_prefix"},
    "sampling": {"temperature", "top_p", "max_new_tokens"},
    "parse": {
        "mode", "separator", "drop_preamble", "qa_item_start",
        "sequence_template", "min_item_chars", "max_items", "grounded_only",
    },
}


def _check_template(path: Path, key: str, template: str, required: set[str]) -> None:
    try:
        names = {
            name for _, name, _, _ in string.Formatter().parse(template) if name is not None
        }
    except ValueError as e:
        raise PolicyError(f"{path}: field '{key}' is not a valid template: {e}") from None
    unknown = names - required - _PLACEHOLDERS
    if unknown:
        raise PolicyError(
            f"{path}: field '{key}' uses unknown placeholder(s) {sorted(unknown)}; "
            f"allowed: {sorted(required | _PLACEHOLDERS)}"
        )


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; every error names the file and the field."""
    data = _read_toml(path)
    if data.get("domain", "knowledge") != "knowledge":
        raise PolicyError(f"{path}: a policy of the {data['domain']!r} domain, not a knowledge policy "
                          "(policy.active names a knowledge policy)")
    _check_known_fields(data, path)
    chat_system, chat_user, base_prompt = _prompts(data, path)
    sampling = _sampling(data, path)
    parse = _parse_rules(data, path)
    questions = _question_rules(data, path)
    name = _field(data, "name", str, path, path.stem)
    if name != path.stem:
        raise PolicyError(f"{path}: field 'name' is '{name}' but the file is {path.name}; they must match")
    return Policy(
        name=name,
        description=_field(data, "description", str, path, ""),
        chat_system=chat_system,
        chat_user=chat_user,
        base_prompt=base_prompt,
        base_completion_prefix=_field(data, "base.completion_prefix", str, path, ""),
        sampling=sampling,
        parse=parse,
        path=path,
        questions=questions,
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: not valid TOML: {e}") from None


def _check_known_fields(data: dict[str, Any], path: Path) -> None:
    """A misspelt field would otherwise be ignored silently, its default used instead."""
    for section, known in _KNOWN.items():
        table = data if not section else data.get(section, {})
        if not isinstance(table, dict):
            raise PolicyError(f"{path}: [{section}] must be a table")
        for key in table:
            if key not in known:
                where = f"[{section}]" if section else "the top level"
                raise PolicyError(f"{path}: unknown field '{key}' in {where}")


def _prompts(data: dict[str, Any], path: Path) -> tuple[str, str, str]:
    """(chat.system, chat.user, base.prompt): valid templates, the passage in each prompt."""
    chat_system = _field(data, "chat.system", str, path, "")
    chat_user = _field(data, "chat.user", str, path)
    base_prompt = _field(data, "base.prompt", str, path)
    for key, template in (("chat.system", chat_system), ("chat.user", chat_user), ("base.prompt", base_prompt)):
        _check_template(path, key, template, set())
    if "{passage}" not in chat_user and "{passage}" not in chat_system:
        raise PolicyError(f"{path}: field 'chat.user' must contain {{passage}}")
    if "{passage}" not in base_prompt:
        raise PolicyError(f"{path}: field 'base.prompt' must contain {{passage}}")
    return chat_system, chat_user, base_prompt


def _sampling(data: dict[str, Any], path: Path) -> Sampling:
    sampling = Sampling(
        max_new_tokens=_field(data, "sampling.max_new_tokens", int, path, 512),
        temperature=_field(data, "sampling.temperature", float, path, 1.0),
        top_p=_field(data, "sampling.top_p", float, path, 0.95),
    )
    if sampling.max_new_tokens <= 0:
        raise PolicyError(f"{path}: field 'sampling.max_new_tokens' must be positive")
    if sampling.temperature < 0:
        raise PolicyError(f"{path}: field 'sampling.temperature' must be >= 0")
    if not 0 < sampling.top_p <= 1:
        raise PolicyError(f"{path}: field 'sampling.top_p' must be in (0, 1]")
    return sampling


def _parse_rules(data: dict[str, Any], path: Path) -> ParseRules:
    defaults = ParseRules()
    mode = _field(data, "parse.mode", str, path, defaults.mode)
    if mode not in PARSE_MODES:
        raise PolicyError(f"{path}: field 'parse.mode' must be one of {PARSE_MODES}, got {mode!r}")
    qa_item_start = _field(data, "parse.qa_item_start", str, path, defaults.qa_item_start)
    try:
        re.compile(qa_item_start)
    except re.error as e:
        raise PolicyError(f"{path}: field 'parse.qa_item_start' is not a valid regex: {e}") from None
    sequence_template = _field(data, "parse.sequence_template", str, path, defaults.sequence_template)
    _check_template(path, "parse.sequence_template", sequence_template, {"item"})
    if sequence_template.count("{item}") != 1:
        raise PolicyError(f"{path}: field 'parse.sequence_template' must contain {{item}} exactly once")
    return ParseRules(
        mode=mode,
        separator=_field(data, "parse.separator", str, path, defaults.separator),
        drop_preamble=_field(data, "parse.drop_preamble", bool, path, defaults.drop_preamble),
        qa_item_start=qa_item_start,
        sequence_template=sequence_template,
        min_item_chars=_field(data, "parse.min_item_chars", int, path, defaults.min_item_chars),
        max_items=_field(data, "parse.max_items", int, path, defaults.max_items),
        grounded_only=_field(data, "parse.grounded_only", bool, path, defaults.grounded_only),
    )


def _question_rules(data: dict[str, Any], path: Path) -> QuestionRules:
    defaults = QuestionRules()
    mode = _field(data, "questions.mode", str, path, defaults.mode)
    if mode not in QUESTION_MODES:
        raise PolicyError(f"{path}: field 'questions.mode' must be one of {QUESTION_MODES}, got {mode!r}")
    cloze_template = _field(data, "questions.cloze_template", str, path, defaults.cloze_template)
    _check_template(path, "questions.cloze_template", cloze_template, {"cloze"})
    if "{cloze}" not in cloze_template:
        raise PolicyError(f"{path}: field 'questions.cloze_template' must contain {{cloze}}")
    return QuestionRules(mode, cloze_template)


def available_policies(policy_dir: Path) -> list[str]:
    return sorted(p.stem for p in policy_dir.glob("*.toml"))


def load_active_policy(policy_dir: Path, name: str) -> Policy:
    path = policy_dir / f"{name}.toml"
    if not path.exists():
        known = ", ".join(available_policies(policy_dir)) or "none"
        raise PolicyError(f"policy '{name}' not found: no {path} (available: {known})")
    return load_policy(path)
