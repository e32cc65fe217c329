"""The trajectory HTML viewer: diffs, escaping, one and many trajectories."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from memtrain.agent.trajectory import ModelCall, Trajectory
from memtrain.viz import memory_diff, render_trajectory_html, save_trajectory_html


class _Collector(HTMLParser):
    """Visible text and tag names of a page, via the standard library parser."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []
        self.ins: list[str] = []
        self.dels: list[str] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._stack.append(tag)

    def handle_endtag(self, tag):
        if self._stack and self._stack[-1] == tag:
            self._stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._stack and self._stack[-1] == "ins":
            self.ins.append(data)
        if self._stack and self._stack[-1] == "del":
            self.dels.append(data)


def parse(page: str) -> _Collector:
    collector = _Collector()
    collector.feed(page)
    return collector


@pytest.fixture
def trajectory() -> Trajectory:
    memories = ["No previous memory", "Lyon is in France", "Lyon is on the Rhone in France"]
    return Trajectory(
        doc_id="doc<1>",
        group=0,
        problem="Which river flows through [MASK] & why?",
        chunks=["Lyon lies in France. <script>alert(1)</script>", "The Rhone flows through Lyon."],
        memories=memories,
        calls=[
            ModelCall("update", 1, [1, 2, 3], [5, 6, 2], memories[1], [-0.1, -0.2, -0.3], True),
            ModelCall("update", 2, [1, 2, 3, 4], [7, 8, 9], memories[2], [-0.1] * 3, False),
            ModelCall("final", 3, [1, 2], [10, 2], "\\boxed{Rhone}", [-0.5, -0.1], True),
            ModelCall("recall", 3, [1], [11], "\\boxed{<b>Lyon</b>}", [-1.0], True),
        ],
        answer="\\boxed{Rhone}",
        truncated_tokens=12,
    )


def test_memory_diff_marks_added_and_dropped_words():
    assert memory_diff("Lyon is in France", "Lyon is on the Rhone in France") == [
        ("kept", "Lyon is"),
        ("added", "on the Rhone"),
        ("kept", "in France"),
    ]
    assert memory_diff("a b c", "a c d") == [("kept", "a"), ("dropped", "b"), ("kept", "c"), ("added", "d")]
    assert memory_diff("", "") == []


def test_page_shows_chunks_beside_memories_with_the_diff_and_answer(trajectory):
    page = render_trajectory_html(trajectory)
    parsed = parse(page)
    text = "".join(parsed.text)
    assert page.startswith("<!DOCTYPE html>")
    for chunk in trajectory.chunks:
        assert chunk in text
    assert trajectory.problem in text and "\\boxed{Rhone}" in text
    # step 1 drops the initial memory and adds the first one; step 2 adds "on the Rhone"
    assert "on the Rhone" in parsed.ins and "No previous memory" in parsed.dels
    assert "+3 words, \u22120 words" in text
    assert "hit the token budget" in text and "ended with EOS" in text
    assert "12 context tokens centre-truncated" in text
    assert "\\boxed{<b>Lyon</b>}" in text  # other calls (recall) are listed too


def test_everything_is_escaped_and_nothing_is_fetched(trajectory):
    page = render_trajectory_html(trajectory)
    tags = set(parse(page).tags)
    assert "script" not in tags and "b" not in tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "doc&lt;1&gt;" in page and "[MASK] &amp; why?" in page
    assert not {"link", "img", "iframe"} & tags and "http" not in page


def test_save_one_or_many(tmp_path, trajectory):
    single = save_trajectory_html(trajectory, tmp_path / "one" / "t.html")
    assert single.read_text(encoding="utf-8") == render_trajectory_html(trajectory)
    titled = save_trajectory_html(trajectory, tmp_path / "titled.html", title="eval / memory: row 7")
    assert "<title>eval / memory: row 7</title>" in titled.read_text(encoding="utf-8")
    other = Trajectory(doc_id="doc2", group=1, problem="q", chunks=[], memories=["No previous memory"], answer="a")
    many = save_trajectory_html([trajectory, other], tmp_path / "many.html", title="Batch 3")
    page = many.read_text(encoding="utf-8")
    assert page.count("<section") == 2 and "Batch 3" in page and "2 trajectories" in page
    with pytest.raises(TypeError, match="item 1 is a dict"):
        save_trajectory_html([trajectory, {"doc_id": "x"}], tmp_path / "bad.html")


def test_a_scored_trajectory_shows_the_scored_reply_the_gold_answers_and_the_scores(trajectory):
    """The evaluation stores what it scored in the trajectory's metadata; the page shows it (it hid it)."""
    plain = "".join(parse(render_trajectory_html(trajectory)).text)
    assert "Gold answers" not in plain and "Scores" not in plain
    trajectory.metadata.update(
        {"answers": ["Rhone", "The <Rhone>"], "scores": {"em": 1.0, "f1": 0.6667}, "scored_reply": "Rhone river"}
    )
    page = render_trajectory_html(trajectory)
    text = "".join(parse(page).text)
    assert "Scored reply" in text and "Rhone river" in text
    assert "Gold answers" in text and "The <Rhone>" in text and "&lt;Rhone&gt;" in page
    assert "em1.0000" in text and "f10.6667" in text


def test_an_unparsed_final_reply_is_shown_instead_of_an_empty_answer(trajectory):
    """Search pages showed an empty final answer although the final call generated 56 tokens (no <answer> tag)."""
    trajectory.answer = ""
    trajectory.calls[2] = ModelCall("final", 3, [1, 2], [10, 2], "I think it is the Rhone <b>", [-0.5, -0.1], True)
    text = "".join(parse(render_trajectory_html(trajectory)).text)
    assert "no answer parsed from the final call, which generated:" in text and "I think it is the Rhone <b>" in text
