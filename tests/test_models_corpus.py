"""Corpus reading (roff cleanup, splits, missing man/info pages) and the edge-decode bench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.lab import corpus
from models.registry import ModelSet

ROFF = r""".\" comment line
.TH LS "1" "September 2022" "GNU coreutils 9.1" "User Commands"
.SH NAME
ls \- list directory contents
.SH SYNOPSIS
.B ls
[\fI\,OPTION\/\fR]... [\fI\,FILE\/\fR]...
.de XX
.. definition body is dropped
..
.TP
\fB\-a\fR, \fB\-\-all\fR
do not ignore entries starting with \(lq.\(rq
"""

BUDGETS = {"man": 30_000, "info": 20_000, "licenses": 10_000, "python-topics": 30_000}


def test_roff_to_text() -> None:
    text = corpus.roff_to_text(ROFF)
    assert text.startswith("ls(1)")
    assert "NAME" in text and "ls - list directory contents" in text
    assert "[OPTION]... [FILE]..." in text
    assert '-a, --all do not ignore entries starting with "."' in text
    assert "comment" not in text and "definition body" not in text and "\\" not in text


def test_corpus_is_deterministic_and_split() -> None:
    first = corpus.build_corpus(BUDGETS)
    second = corpus.build_corpus(BUDGETS)
    assert [(d.name, d.held_out, d.text) for d in first.documents] == [
        (d.name, d.held_out, d.text) for d in second.documents
    ]
    assert first.stats == second.stats
    for in_domain in (True, False):
        assert first.texts(in_domain=in_domain, held_out=True)
        assert first.texts(in_domain=in_domain, held_out=False)
    assert first.domain == corpus.DEFAULT_DOMAIN


def test_missing_man_and_info_pages_fall_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setitem(corpus.READERS, "man", lambda: corpus.iter_man(empty))
    monkeypatch.setitem(corpus.READERS, "info", lambda: corpus.iter_info(empty))
    monkeypatch.setitem(corpus.READERS, "licenses", lambda: corpus.iter_licenses(empty))
    budgets = {**BUDGETS, "python-docstrings": 30_000}
    result = corpus.build_corpus(budgets, min_domain_bytes=5_000)
    assert result.domain == corpus.FALLBACK_DOMAIN
    assert "man/info pages not installed" in result.stats["domain_fallback"]
    assert result.stats["sources"]["man"]["bytes"] == 0
    assert result.texts(in_domain=False, held_out=True)


def test_unknown_source_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown corpus source"):
        corpus.build_corpus({"wikipedia": 10})


def test_edge_decode_bench_on_tiny_set(
    tiny_models: ModelSet,
    tiny_models_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from hybridgen.benches import edge_decode as bench

    monkeypatch.setenv("HG_HOME", str(tiny_models_home))
    monkeypatch.setattr(bench, "measure_read_bandwidth", lambda: 10.0)
    assert bench.main(["--json", "--runs", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == f"bundled:{tiny_models.version}"
    # The ratios are the measured rates'; the rates themselves are the bench's to report.
    for key in ("ratio_int4", "ratio_int8"):
        rate = result[key.replace("ratio_", "edge_") + "_tok_s"]
        expected = rate / result["torch_fp32_tok_s"]
        assert result[key] == pytest.approx(expected, rel=0.02, abs=6e-3), key  # 2 decimals
    assert 0 < result["bytes_per_token"] < tiny_models.manifest["edge_builds"]["int4"]["bytes"]
    assert result["new_tokens"] == tiny_models.edge_context_length - 32


def test_chat_examples_use_the_chat_format() -> None:
    result = corpus.build_corpus(BUDGETS)
    examples = result.chat_texts(in_domain=True)
    assert examples
    for example in examples:
        assert example.startswith("<|user|>\n") and example.endswith("<|end|>\n")
        assert "\n<|assistant|>\n" in example
    man_questions = [e for e in examples if e.startswith("<|user|>\nWhat does ")]
    assert man_questions
    assert len(result.chat_texts()) > len(examples)
