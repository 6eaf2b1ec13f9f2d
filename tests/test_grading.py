import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from seal_agent.config import JudgeConfig, QAConfig
from seal_agent.errors import SealError
from seal_agent.qa.grading import Judge, contains, exact_match, grade, normalize_answer, parse_yes_no, settled, token_f1


def test_normalize_like_squad():
    assert normalize_answer("The  Normans!") == "normans"
    assert normalize_answer("An 'apple', a pear") == "apple pear"


def test_exact_f1_contains():
    assert exact_match("the Normans.", "Normans")
    assert not exact_match("Normans of France", "Normans")
    assert token_f1("Rollo the Viking", "Rollo") == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))
    assert token_f1("nothing", "Rollo") == 0.0
    assert contains("It was led by Rollo, a Viking.", "Rollo")
    assert not contains("Rollonia", "Rollo")  # word boundaries
    assert not contains("anything", "")


def test_grade_uses_configured_grader():
    assert grade("It was Rollo.", "Rollo", QAConfig(grader="contains"))
    assert not grade("It was Rollo.", "Rollo", QAConfig(grader="exact"))
    assert grade("Rollo the Viking", "Rollo Viking", QAConfig(grader="f1", f1_threshold=0.5))


def test_settled_only_once_no_later_word_can_change_the_grade():
    cfg = QAConfig()
    assert not settled("It is presented in Kelvar", "Kelvar", cfg)  # "Kelvarian" may follow
    assert settled("It is presented in Kelvar.", "Kelvar", cfg)
    assert settled("It is presented in Kelvar and", "Kelvar", cfg)
    assert settled("In the 10th century, in", "10th century", cfg)
    assert not settled("In the 10th", "10th century", cfg)
    assert not settled("", "Kelvar", cfg)
    # every prefix that is settled is graded correct, and so is every continuation
    whole = "The prize, in Kelvar's harbour town, is presented every three years."
    for n in range(len(whole) + 1):
        if settled(whole[:n], "Kelvar", cfg):
            assert grade(whole[:n], "Kelvar", cfg) and grade(whole, "Kelvar", cfg)
    assert any(settled(whole[:n], "Kelvar", cfg) for n in range(len(whole)))
    for grader in ("exact", "f1"):  # later words change these grades
        assert not settled("Kelvar is", "Kelvar", QAConfig(grader=grader))


def test_parse_yes_no():
    assert parse_yes_no("Yes.")
    assert not parse_yes_no("No")
    assert not parse_yes_no("yes or no?")
    assert not parse_yes_no("")


class _JudgeHandler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _JudgeHandler.seen.append((self.path, self.headers.get("Authorization"), body))
        prompt = body["messages"][0]["content"]
        verdict = "yes" if "Student answer: Rollo" in prompt else "no"
        reply = {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": verdict}}],
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_judge_talks_to_an_openai_compatible_endpoint(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MY_KEY", "secret")
        judge = Judge(JudgeConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="judge-1",
                                  api_key_env="MY_KEY"))
        assert judge.grade("Who led them?", "Rollo", "Rollo")
        assert not judge.grade("Who led them?", "Rollo", "Harald")
        assert not judge.grade("Who led them?", "Rollo", "   ")  # empty: not sent
        assert len(_JudgeHandler.seen) == 2
        path, auth, body = _JudgeHandler.seen[0]
        assert path == "/v1/chat/completions" and auth == "Bearer secret" and body["model"] == "judge-1"
        assert "Gold answer: Rollo" in body["messages"][0]["content"]
    finally:
        server.shutdown()


def test_judge_needs_configuration():
    with pytest.raises(SealError, match="judge.base_url"):
        Judge(JudgeConfig())


def test_the_judge_is_shown_the_question_as_the_model_was_asked_it(tiny_model_dir, tiny_cfg):
    import dataclasses

    from seal_agent.documents import QA, Passage
    from seal_agent.evaluation.ladder import Evaluator
    from seal_agent.model.loader import load_model, load_tokenizer

    class RecordingJudge:
        def __init__(self):
            self.seen = []

        def grade(self, question, gold, prediction):
            self.seen.append((question, gold))
            return True

    qa = dataclasses.replace(tiny_cfg.qa, question_template="About {title}: {question}", max_new_tokens=2)
    cfg = dataclasses.replace(tiny_cfg, qa=qa)
    judge = RecordingJudge()
    evaluator = Evaluator(cfg, load_model(tiny_model_dir, cfg), load_tokenizer(tiny_model_dir), policy=None,
                          judge=judge)
    passage = Passage("Normans", "Rollo led the Norse raiders.", [QA("Who led them?", "Rollo")])
    [record] = evaluator.answer(evaluator.model, [(0, passage)], "base")
    assert judge.seen == [("About Normans: Who led them?", "Rollo")] and record.judge
