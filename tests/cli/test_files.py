"""CSV / JSONL task files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stiefel_peft.cli.files import (
    load_classification_file,
    load_prompt_completion_file,
    read_records,
)


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return path


def test_csv_classification_with_named_columns(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "reviews.csv",
        "review,sentiment,extra",
        ['"Great, truly",positive,a', "Awful,negative,b", "Fine,positive,c"],
    )
    examples, names = load_classification_file(path, "review", "sentiment")
    assert names == ("negative", "positive")
    assert examples == [
        {"text": "Great, truly", "label": 1},
        {"text": "Awful", "label": 0},
        {"text": "Fine", "label": 1},
    ]


def test_jsonl_integer_labels_sort_numerically(tmp_path: Path) -> None:
    records = [{"text": f"t{i}", "label": label} for i, label in enumerate([10, 2, 2, 10, 9])]
    examples, names = load_classification_file(_write_jsonl(tmp_path / "d.jsonl", records))
    assert names == ("2", "9", "10")
    assert [e["label"] for e in examples] == [2, 0, 0, 2, 1]


def test_given_label_names_accept_names_and_indices(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": "a", "label": 0}, {"text": "b", "label": "positive"}],
    )
    examples, names = load_classification_file(path, label_names=("negative", "positive"))
    assert names == ("negative", "positive")
    assert [e["label"] for e in examples] == [0, 1]
    with pytest.raises(ValueError, match="not one of"):
        load_classification_file(path, label_names=("bad", "good"))


def test_missing_column_is_named_with_the_columns_present(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "review,sentiment", ["a,positive", "b,negative"])
    with pytest.raises(ValueError, match=r"'text' is missing.*columns present: review, sentiment"):
        load_classification_file(path)
    with pytest.raises(ValueError, match=r"'prompt' is missing"):
        load_prompt_completion_file(path)


def test_a_single_label_is_rejected(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "text,label", ["a,x", "b,x"])
    with pytest.raises(ValueError, match="2 distinct labels"):
        load_classification_file(path)


def test_prompt_completion_pairs(tmp_path: Path) -> None:
    records = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "Hi", "completion": " there"}]
    pairs = load_prompt_completion_file(_write_jsonl(tmp_path / "p.jsonl", records))
    assert pairs == records
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": ""}])
    with pytest.raises(ValueError, match="empty 'completion'"):
        load_prompt_completion_file(bad)


def test_read_records_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "absent.csv")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.csv, \.jsonl or \.json"):
        read_records(tmp_path / "d.txt")
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=":2 is not a JSON object"):
        read_records(tmp_path / "d.jsonl")
    (tmp_path / "e.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="no rows"):
        read_records(tmp_path / "e.csv")


def test_json_files_in_every_layout_read_as_the_same_rows(tmp_path: Path) -> None:
    rows = [{"text": "fine", "label": "positive"}, {"text": "dull", "label": "negative"}]
    layouts = {
        "list.json": json.dumps(rows),
        "columns.json": json.dumps({"text": ["fine", "dull"], "label": ["positive", "negative"]}),
        "lines.json": "\n".join(json.dumps(row) for row in rows) + "\n",  # Dataset.to_json
    }
    for name, text in layouts.items():
        (tmp_path / name).write_text(text)
        assert read_records(tmp_path / name) == rows, name
    (tmp_path / "ragged.json").write_text(json.dumps({"text": ["a", "b"], "label": ["x"]}))
    with pytest.raises(ValueError, match="columns of different lengths"):
        read_records(tmp_path / "ragged.json")
    (tmp_path / "numbers.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list of objects"):
        read_records(tmp_path / "numbers.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_records(tmp_path / "broken.json")
