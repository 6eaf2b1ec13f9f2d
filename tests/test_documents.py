import json

import pytest

from seal_agent.documents import passage_hash, read_document, split_text
from seal_agent.errors import DocumentError


def words(text: str) -> int:
    """A stand-in token counter: one token per whitespace-separated word."""
    return len(text.split())


def read(path, max_tokens=400):
    return read_document(path, words, max_tokens)


def make_pdf(text_lines: list[str], title: str | None = None) -> bytes:
    """A minimal valid PDF with one page of Helvetica text."""
    stream = "BT /F1 12 Tf 72 720 Td " + " ".join(f"({line}) Tj 0 -16 Td" for line in text_lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    if title:
        objects.append(f"<< /Title ({title}) >>")
    out = b"%PDF-1.4\n"
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    info = f" /Info {len(objects)} 0 R" if title else ""
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_txt_title_from_filename(tmp_path):
    p = tmp_path / "norman_conquest.txt"
    p.write_text("The Normans came from Normandy.\n\nRollo led them.")
    doc = read(p)
    assert doc.title == "norman conquest" and doc.kind == "txt"
    assert [x.text for x in doc.passages] == ["The Normans came from Normandy.\n\nRollo led them."]


def test_markdown_title_from_heading(tmp_path):
    p = tmp_path / "notes.md"
    p.write_text("Intro line.\n\n# The Normans\n\nRollo led the Norse raiders.\n\n## Later\n\nThey conquered England.")
    doc = read(p)
    assert doc.title == "The Normans" and doc.kind == "md"
    text = doc.passages[0].text
    assert "Rollo led the Norse raiders." in text and "#" not in text


def test_html_text_only(tmp_path):
    p = tmp_path / "page.html"
    p.write_text("<html><head><title>Norman page</title><style>p{color:red}</style></head>"
                 "<body><script>var x = 1;</script><h1>Normans</h1><p>Rollo <b>led</b> them.</p>"
                 "<p>They settled in Normandy.</p></body></html>")
    doc = read(p)
    assert doc.title == "Norman page" and doc.kind == "html"
    text = doc.passages[0].text
    assert "Rollo led them." in text and "They settled in Normandy." in text
    assert "var x" not in text and "color" not in text


def test_pdf(tmp_path):
    p = tmp_path / "paper.pdf"
    p.write_bytes(make_pdf(["The Normans were led by Rollo.", "They settled in Normandy."], title="Norman Paper"))
    doc = read(p)
    assert doc.title == "Norman Paper" and doc.kind == "pdf"
    assert "Rollo" in doc.passages[0].text and "Normandy" in doc.passages[0].text


def test_squad_json_and_jsonl(tmp_path):
    items = [{"title": "Normans", "context": "Rollo led them.", "questions": [{"question": "Who?", "answer": "Rollo"}]},
             {"title": "Normans", "context": "They settled.", "questions": [{"question": "Did they?", "answers": [{"text": "yes"}]}]}]
    j = tmp_path / "a.json"
    j.write_text(json.dumps(items))
    doc = read(j)
    assert doc.kind == "squad" and doc.title == "Normans" and len(doc.passages) == 2
    assert doc.passages[1].questions[0].answer == "yes"
    single = tmp_path / "one.json"
    single.write_text(json.dumps(items[0]))
    assert len(read(single).passages) == 1
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    assert [p.text for p in read(jl).passages] == ["Rollo led them.", "They settled."]


@pytest.mark.parametrize("name, content, message", [
    ("x.bin", b"data", "unsupported file type '.bin'"),
    ("empty.txt", b"", "the file is empty"),
    ("blank.txt", b"   \n\n  ", "contains no text"),
    ("binary.txt", b"\x00\x01\x02abc", "binary"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("bad.json", b"{not json", "not valid JSON"),
    ("bad.jsonl", b'{"context": "x"}\n{oops', "line 2 is not valid JSON"),
    ("noctx.json", b'[{"title": "t"}]', "item 0: missing or empty 'context'"),
    ("noans.json", b'[{"title": "t", "context": "c", "questions": [{"question": "q"}]}]', "question 0: needs an 'answer'"),
    ("fake.pdf", b"%PDF-1.4 garbage", "not a readable PDF"),
])
def test_bad_files_get_clear_errors(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DocumentError, match=message):
        read(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DocumentError, match="no such file"):
        read(tmp_path / "nope.txt")
    with pytest.raises(DocumentError, match="is a directory"):
        read(tmp_path)


def test_split_is_paragraph_aware_and_within_budget():
    paras = [" ".join(f"p{i}w{j}" for j in range(30)) for i in range(5)]
    passages = split_text("\n\n".join(paras), words, max_tokens=70)
    assert [words(p) for p in passages] == [60, 60, 30]
    assert passages[0] == paras[0] + "\n\n" + paras[1]  # whole paragraphs kept together


def test_split_long_paragraph_at_sentences_then_words():
    sentence = " ".join(["Word"] + ["word"] * 8) + "."
    text = " ".join([sentence] * 6)
    passages = split_text(text, words, max_tokens=25)
    assert [words(p) for p in passages] == [18, 18, 18]  # two whole sentences each
    assert all(p.endswith(".") for p in passages)
    huge = " ".join(["w"] * 100)
    parts = split_text(huge, words, max_tokens=30)
    assert all(words(p) <= 30 for p in parts) and sum(map(words, parts)) == 100


def test_short_tail_joins_its_neighbour():
    text = " ".join(["a"] * 50) + "\n\n" + "tail end"
    assert len(split_text(text, words, max_tokens=60, min_tokens=5)) == 1
    assert len(split_text(text, words, max_tokens=60, min_tokens=0)) == 1  # fits anyway
    assert len(split_text(text, words, max_tokens=50, min_tokens=5)) == 2  # does not fit: kept apart


def test_passage_hash_ignores_whitespace_only():
    assert passage_hash("Rollo  led\nthem.") == passage_hash(" Rollo led them. ")
    assert passage_hash("Rollo led them.") != passage_hash("Rollo led them!")
