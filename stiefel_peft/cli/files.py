"""Task data from rows: classification or prompt/completion pairs, and the rows of local
CSV, JSONL and JSON files.

Files are read with the standard library only. A CSV file has a header row; a JSONL file holds
one JSON object per line (blank lines skipped); a JSON file holds a list of objects, an object
of equal-length column lists, or JSON lines (what ``datasets.Dataset.to_json`` writes).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "classification_examples",
    "load_classification_file",
    "load_prompt_completion_file",
    "prompt_completion_examples",
    "read_records",
]


def _json_lines(file: Path, lines: list[str]) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}:{number} is not valid JSON: {error}") from error
        if not isinstance(record, dict):
            raise ValueError(f"{file}:{number} is not a JSON object")
        records.append(record)
    return records


def _json_document(file: Path, text: str) -> list[dict[str, Any]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # one object per line, as Dataset.to_json writes
            return _json_lines(file, text.splitlines())
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    if isinstance(document, dict) and all(isinstance(v, list) for v in document.values()):
        lengths = {len(v) for v in document.values()}
        if len(lengths) > 1:
            raise ValueError(f"{file} holds columns of different lengths {sorted(lengths)}")
        columns = list(document)
        rows = zip(*document.values(), strict=True)
        return [dict(zip(columns, row, strict=True)) for row in rows]
    if isinstance(document, dict):
        return [document]
    if isinstance(document, list) and all(isinstance(row, dict) for row in document):
        return document
    raise ValueError(f"{file} must hold a list of objects, an object of column lists or JSON lines")


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``.csv`` (header row), ``.jsonl`` or ``.json`` file as dicts.

    Raises:
        FileNotFoundError: no such file.
        ValueError: another suffix, a line or document that is not JSON objects, or no rows.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data file {str(file)!r} does not exist")
    suffix = file.suffix.lower()
    if suffix == ".csv":
        with file.open(encoding="utf-8", newline="") as handle:
            records: list[dict[str, Any]] = list(csv.DictReader(handle))
    elif suffix == ".jsonl":
        records = _json_lines(file, file.read_text(encoding="utf-8").splitlines())
    elif suffix == ".json":
        records = _json_document(file, file.read_text(encoding="utf-8"))
    else:
        raise ValueError(
            f"data file {str(file)!r} must end in .csv, .jsonl or .json, not {suffix!r}"
        )
    if not records:
        raise ValueError(f"data file {str(file)!r} holds no rows")
    return records


def _require_columns(records: Sequence[dict[str, Any]], columns: Sequence[str], file: str) -> None:
    present = sorted({key for record in records for key in record})
    for column in columns:
        missing = [i for i, record in enumerate(records) if column not in record]
        if missing:
            where = "any row" if len(missing) == len(records) else f"row {missing[0] + 1}"
            raise ValueError(
                f"column {column!r} is missing from {where} of {file}; columns present: "
                f"{', '.join(present)}"
            )


def load_classification_file(
    path: str | os.PathLike[str],
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> tuple[list[dict[str, str | int]], tuple[str, ...]]:
    """Classification examples of a file (:func:`read_records`, then
    :func:`classification_examples`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: as :func:`read_records` and :func:`classification_examples`.
    """
    return classification_examples(
        read_records(path), str(path), text_column, label_column, label_names
    )


def classification_examples(
    records: Sequence[dict[str, Any]],
    source: str,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> tuple[list[dict[str, str | int]], tuple[str, ...]]:
    """Classification examples ``{"text": str, "label": int}`` and their label names.

    Without ``label_names`` the names are the distinct label values as strings, sorted (numerically
    when all are integers), and ``label`` is the index into them. With ``label_names`` each value
    must be one of the names or an integer index into them.

    Raises:
        ValueError: a missing column (the message lists the columns present), an empty text, a
            label not among ``label_names``, or fewer than two distinct labels.
    """
    _require_columns(records, (text_column, label_column), source)
    values = [str(record[label_column]).strip() for record in records]
    if label_names is None:
        distinct = set(values)
        numeric = all(v.lstrip("-").isdigit() for v in distinct)
        names = tuple(sorted(distinct, key=int if numeric else str))
    else:
        names = tuple(label_names)
    if len(names) < 2:
        raise ValueError(
            f"column {label_column!r} of {source} needs >= 2 distinct labels, got {list(names)}"
        )
    index = {name: i for i, name in enumerate(names)}
    examples: list[dict[str, str | int]] = []
    for row, (record, value) in enumerate(zip(records, values, strict=True), start=1):
        text = str(record[text_column])
        if not text.strip():
            raise ValueError(f"row {row} of {source} has an empty {text_column!r}")
        if value in index:
            label = index[value]
        elif value.isdigit() and int(value) < len(names):
            label = int(value)
        else:
            raise ValueError(
                f"row {row} of {source}: label {value!r} is not one of {list(names)} "
                "or an index into them"
            )
        examples.append({"text": text, "label": label})
    return examples, names


def load_prompt_completion_file(
    path: str | os.PathLike[str],
    prompt_column: str = "prompt",
    completion_column: str = "completion",
) -> list[dict[str, str]]:
    """Prompt/completion pairs of a file (:func:`read_records`, then
    :func:`prompt_completion_examples`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: as :func:`read_records` and :func:`prompt_completion_examples`.
    """
    return prompt_completion_examples(
        read_records(path), str(path), prompt_column, completion_column
    )


def prompt_completion_examples(
    records: Sequence[dict[str, Any]],
    source: str,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
) -> list[dict[str, str]]:
    """Prompt/completion pairs ``{"prompt": str, "completion": str}`` from rows.

    Raises:
        ValueError: a missing column (the message lists the columns present) or an empty
            completion.
    """
    _require_columns(records, (prompt_column, completion_column), source)
    pairs = []
    for row, record in enumerate(records, start=1):
        completion = str(record[completion_column])
        if not completion:
            raise ValueError(f"row {row} of {source} has an empty {completion_column!r}")
        pairs.append({"prompt": str(record[prompt_column]), "completion": completion})
    return pairs
