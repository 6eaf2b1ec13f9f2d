"""Documents -> passages.

Reads .txt, .md, .html/.htm, .pdf and SQuAD-style .json/.jsonl files into
`Document`s: a title and a list of `Passage`s, each with a stable content hash
and (for SQuAD-style files) its questions. Long text is split into passages
that fit the model: at paragraph boundaries first, then sentences, then tokens,
counting tokens with the model's tokenizer (passed in as a function, so this
module needs no model).

A file whose content cannot be parsed raises `DocumentError` with the reason,
whatever the parser raised (malformed or deeply nested JSON, a number too long
to read, a broken PDF, text with lone surrogates): bad content is the user's to
fix and never worth retrying. Only `OSError` (the file system) and
`MemoryError` pass through as they are.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DocumentError

TEXT_TYPES = {".txt", ".md", ".markdown", ".html", ".htm", ".pdf"}
QA_TYPES = {".json", ".jsonl"}
SUPPORTED = TEXT_TYPES | QA_TYPES

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclass
class Passage:
    title: str
    text: str
    questions: list[QA] = field(default_factory=list)
    # Self-edits written by other models, carried by SQuAD-style files
    # (`external_self_edits: {"gpt-4.1": [...]}`); used by `eval squad`.
    external_self_edits: dict[str, list[str]] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return passage_hash(self.text)


@dataclass
class Document:
    path: Path
    title: str
    kind: str
    passages: list[Passage]


def shown(text: object) -> str:
    """`text` safe to put in one line of a log or a message: characters that are
    not printable (newlines, escape sequences, lone surrogates from undecodable
    file names) are written as in a Python string literal (`\\n`, `\\x1b`,
    `\\udcff`); everything else, non-ASCII letters included, is left as it is.
    Applying it twice changes nothing."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def normalize_ws(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def passage_hash(text: str) -> str:
    """Stable content hash: whitespace differences do not make a new passage."""
    return hashlib.sha256(normalize_ws(text).encode("utf-8")).hexdigest()


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- reading -------------------------------------------------------------


def _title_from_filename(path: Path) -> str:
    return re.sub(r"[_\-]+", " ", path.stem).strip() or path.name


def _decode(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise DocumentError(f"{shown(path.name)}: looks like a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{shown(path.name)}: not UTF-8 text ({e.reason} at byte {e.start})") from None


_MD_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _read_markdown(path: Path) -> tuple[str, str]:
    """Heading markers are dropped from the text; the first H1 (else the first
    heading, else the file name) is the title."""
    lines, headings = [], []
    for line in _decode(path).splitlines():
        m = _MD_HEADING.match(line)
        if m:
            headings.append((len(m.group(1)), m.group(2)))
            lines.append(m.group(2))
        else:
            lines.append(line)
    h1 = [text for level, text in headings if level == 1]
    title = (h1 or [text for _, text in headings] or [_title_from_filename(path)])[0]
    return title, "\n".join(lines)


def _read_html(path: Path) -> tuple[str, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_decode(path), "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = None
    if soup.title and soup.title.get_text(strip=True):
        title = soup.title.get_text(strip=True)
    elif soup.find("h1"):
        title = soup.find("h1").get_text(" ", strip=True)
    if soup.head:
        soup.head.decompose()
    # Block elements become paragraph breaks; inline text stays joined.
    blocks = ["p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br", "section", "article", "pre", "blockquote"]
    for tag in soup.find_all(blocks):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    text = soup.get_text()
    text = "\n\n".join(normalize_ws(p) for p in re.split(r"\n\s*\n", text) if p.strip())
    return title or _title_from_filename(path), text


def _read_pdf(path: Path) -> tuple[str, str]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            try:
                reader.decrypt("")
            except Exception:  # noqa: BLE001
                raise DocumentError(f"{shown(path.name)}: the PDF is encrypted") from None
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = (reader.metadata.title if reader.metadata else None) or ""
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, OSError) as e:
        raise DocumentError(f"{shown(path.name)}: not a readable PDF ({shown(e)})") from None
    return meta_title.strip() or _title_from_filename(path), "\n\n".join(pages)


_MAX_INT_DIGITS = 4300  # Python's own limit (sys.get_int_max_str_digits) on reading an int


def _json_int(digits: str) -> int:
    # Past the limit int() raises with advice meant for programmers (sys.set_int_max_str_digits).
    if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"a number of {len(digits):,} digits (at most {_MAX_INT_DIGITS:,} can be read)")
    return int(digits)


def _json(text: str, where: str) -> object:
    try:
        return json.loads(text, parse_int=_json_int)
    except json.JSONDecodeError as e:
        raise DocumentError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise DocumentError(f"{where} is nested too deeply to read (thousands of levels of [ or {{)") from None
    except ValueError as e:
        raise DocumentError(f"{where} is not readable JSON: {shown(e)}") from None


def _qa_items(path: Path) -> list[dict]:
    text = _decode(path)
    if path.suffix.lower() == ".jsonl":
        return [_json(line, f"{shown(path.name)}: line {i}")
                for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    data = _json(text, shown(path.name))
    if isinstance(data, dict) and isinstance(data.get("data"), list) and "context" not in data:
        data = data["data"]
    return data if isinstance(data, list) else [data]


def _answer_of(q: dict, where: str) -> str:
    if isinstance(q.get("answer"), str):
        return q["answer"]
    answers = q.get("answers")
    if isinstance(answers, list) and answers:
        first = answers[0]
        if isinstance(first, str):
            return first
        if isinstance(first, dict) and isinstance(first.get("text"), str):
            return first["text"]
    raise DocumentError(f"{where}: needs an 'answer' string (or 'answers' list)")


def _read_squad(path: Path) -> tuple[str, list[Passage]]:
    passages = []
    for i, item in enumerate(_qa_items(path)):
        where = f"{shown(path.name)}: item {i}"
        if not isinstance(item, dict):
            raise DocumentError(f"{where} must be an object with 'title', 'context' and 'questions'")
        context = item.get("context")
        if not isinstance(context, str) or not context.strip():
            raise DocumentError(f"{where}: missing or empty 'context' string")
        title = item.get("title", _title_from_filename(path))
        if not isinstance(title, str):
            raise DocumentError(f"{where}: 'title' must be a string")
        questions = item.get("questions", [])
        if not isinstance(questions, list):
            raise DocumentError(f"{where}: 'questions' must be a list")
        qas = []
        for j, q in enumerate(questions):
            qwhere = f"{where}, question {j}"
            if not isinstance(q, dict) or not isinstance(q.get("question"), str):
                raise DocumentError(f"{qwhere}: needs a 'question' string")
            qas.append(QA(q["question"].strip(), _answer_of(q, qwhere).strip()))
        external = item.get("external_self_edits", {})
        if not isinstance(external, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in external.values()
        ):
            raise DocumentError(f"{where}: 'external_self_edits' must map names to lists of strings")
        passages.append(Passage(title=title.strip() or _title_from_filename(path), text=context.strip(),
                                questions=qas, external_self_edits=external))
    if not passages:
        raise DocumentError(f"{shown(path.name)}: no passages (expected {{title, context, questions}} objects)")
    return passages[0].title if len({p.title for p in passages}) == 1 else _title_from_filename(path), passages


def read_document(path: Path, count_tokens: CountTokens, max_tokens: int, min_tokens: int = 0) -> Document:
    """Read one file into a Document. Raises DocumentError with a readable reason."""
    path = Path(path)
    if not path.exists():
        raise DocumentError(f"{shown(path)}: no such file")
    if path.is_dir():
        raise DocumentError(f"{shown(path)}: is a directory")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise DocumentError(
            f"{shown(path.name)}: unsupported file type '{shown(suffix or '(none)')}' "
            f"(supported: {', '.join(sorted(SUPPORTED))})"
        )
    if path.stat().st_size == 0:
        raise DocumentError(f"{shown(path.name)}: the file is empty")
    try:
        doc = _parse(path, suffix, count_tokens, max_tokens, min_tokens)
    except (DocumentError, OSError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - any other failure of a parser is about this file's content
        raise DocumentError(f"{shown(path.name)}: cannot be read ({type(e).__name__}: {shown(e)})") from None
    _check_text(doc)
    return doc


def _parse(path: Path, suffix: str, count_tokens: CountTokens, max_tokens: int, min_tokens: int) -> Document:
    if suffix in QA_TYPES:
        title, passages = _read_squad(path)
        return Document(path=path, title=title, kind="squad", passages=passages)
    if suffix in (".md", ".markdown"):
        title, text = _read_markdown(path)
    elif suffix in (".html", ".htm"):
        title, text = _read_html(path)
    elif suffix == ".pdf":
        title, text = _read_pdf(path)
    else:
        text = _decode(path)
        title = _title_from_filename(path)
    chunks = split_text(text, count_tokens, max_tokens, min_tokens)
    if not chunks:
        raise DocumentError(f"{shown(path.name)}: contains no text")
    kind = {".markdown": "md", ".htm": "html"}.get(suffix, suffix.lstrip("."))
    return Document(path=path, title=title, kind=kind, passages=[Passage(title, c) for c in chunks])


def _check_text(doc: Document) -> None:
    """Text that cannot be stored: a lone surrogate (JSON's "\\ud800", a PDF's broken
    text) is valid in a Python string but not in UTF-8, so SQLite would refuse it
    mid-learning."""
    texts = [doc.title] + [t for p in doc.passages for t in (p.title, p.text)]
    texts += [t for p in doc.passages for q in p.questions for t in (q.question, q.answer)]
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DocumentError(f"{shown(doc.path.name)}: holds text that is not valid Unicode "
                                f"({shown(t[e.start:e.end])}, a lone surrogate)") from None


# -- splitting -----------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def _split_long(unit: str, count_tokens: CountTokens, max_tokens: int) -> list[str]:
    """Split a paragraph over the limit into sentences, and a sentence over it into word runs."""
    if count_tokens(unit) <= max_tokens:
        return [unit]
    sentences = _SENTENCE_END.split(unit)
    if len(sentences) > 1:
        return _pack(sentences, count_tokens, max_tokens, " ")
    words = unit.split(" ")
    pieces, current = [], []
    for w in words:
        if current and count_tokens(" ".join(current + [w])) > max_tokens:
            pieces.append(" ".join(current))
            current = []
        current.append(w)
    if current:
        pieces.append(" ".join(current))
    return pieces


def _pack(units: list[str], count_tokens: CountTokens, max_tokens: int, joiner: str) -> list[str]:
    """Greedily join consecutive units while the result fits."""
    out: list[str] = []
    current = ""
    for unit in units:
        for piece in _split_long(unit, count_tokens, max_tokens):
            candidate = f"{current}{joiner}{piece}" if current else piece
            if current and count_tokens(candidate) > max_tokens:
                out.append(current)
                current = piece
            else:
                current = candidate
    if current:
        out.append(current)
    return out


def split_text(text: str, count_tokens: CountTokens, max_tokens: int, min_tokens: int = 0) -> list[str]:
    """Paragraph-aware split into passages of at most `max_tokens` tokens.

    Paragraphs (blank-line separated) are packed together while they fit; a
    paragraph over the limit is split at sentences, a sentence at words. A
    trailing passage shorter than `min_tokens` joins its predecessor if the two fit.
    """
    paragraphs = [normalize_ws(p) for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n"))]
    paragraphs = [p for p in paragraphs if p]
    passages = _pack(paragraphs, count_tokens, max_tokens, "\n\n")
    if len(passages) > 1 and min_tokens and count_tokens(passages[-1]) < min_tokens:
        merged = passages[-2] + "\n\n" + passages[-1]
        if count_tokens(merged) <= max_tokens:
            passages[-2:] = [merged]
    return passages


def read_qa_passages(path: Path, purpose: str) -> list[Passage]:
    """The passages of a SQuAD-style file (for evaluation, ReSTEM); raises
    DocumentError naming `purpose` when the file is missing or of another kind."""
    path = Path(path)
    if not path.exists():
        raise DocumentError(f"{purpose} data {path} does not exist; pass --data FILE (SQuAD-style JSON)")
    doc = read_document(path, lambda t: len(t.split()), 10**9)
    if doc.kind != "squad":
        raise DocumentError(f"{path}: {purpose} needs a SQuAD-style .json/.jsonl file with questions")
    return doc.passages
