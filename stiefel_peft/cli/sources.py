"""Where a run's model and rows come from, checked before anything heavy loads.

``--data`` is a built-in set, a ``.csv``/``.jsonl``/``.json`` file, a folder written by
``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a dataset name on the
Hugging Face hub (read with ``datasets``, an optional dependency). ``--model`` is a built-in
name, a local folder or a hub id. A hub name is only tried after a quick look at whether the
hub answers at all (no network is the usual case on a cluster node): one clear line then, not
half a minute of retries.
"""

from __future__ import annotations

import importlib.util
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stiefel_peft.cli.assets import BUILTIN_DATASETS

__all__ = ["DATA_SUFFIXES", "Rows", "data_kind", "hub_unreachable", "read_dataset_rows"]

DATA_SUFFIXES = (".csv", ".jsonl", ".json")
_DATASETS_INSTALL = "pip install 'stiefel_peft[data]' (or pip install datasets)"


@dataclass
class Rows:
    """The rows of the training split and, when one was named, of the evaluation split.

    Attributes:
        train: the training rows.
        evaluation: the evaluation split's rows (None: hold examples out of ``train``).
        label_names: the names of a ``datasets.ClassLabel`` label column, else None.
    """

    train: list[dict[str, Any]]
    evaluation: list[dict[str, Any]] | None
    label_names: tuple[str, ...] | None


def data_kind(name: str) -> str:
    """``"builtin"``, ``"file"``, ``"saved"`` (a ``save_to_disk`` folder) or ``"hub"``.

    Raises:
        ValueError: a folder that is not a saved dataset, a path-like name with another
            suffix, or a missing file.
    """
    if name in BUILTIN_DATASETS:
        return "builtin"
    path = Path(name).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json")):
            return "saved"
        raise ValueError(
            f"--data folder {name!r} is not a dataset saved with datasets' save_to_disk "
            "(no dataset_dict.json or state.json in it)"
        )
    if path.suffix.lower() in DATA_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"--data file {name!r} does not exist")
        return "file"
    if name.startswith((".", "/", "~")) or path.suffix or not name.strip():
        raise ValueError(
            f"--data {name!r} is neither a built-in data set "
            f"({', '.join(sorted(BUILTIN_DATASETS))}), a .csv/.jsonl/.json file, a folder "
            "saved with datasets, nor a hub dataset name"
        )
    return "hub"


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it answers.

    ``HF_HUB_OFFLINE`` set counts as unreachable. One HEAD request with ``timeout`` seconds,
    no retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None  # it answered, if only with an error status
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return f"{endpoint} cannot be reached ({reason})"
    return None


def _require_datasets(what: str) -> Any:
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"{what} needs the datasets package: {_DATASETS_INSTALL}")
    import datasets

    return datasets


def _pick_split(loaded: Any, split: str | None, flag: str, source: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise ValueError(
                f"{flag} {name!r} is not a split of {source}; its splits: {', '.join(loaded)}"
            )
        return loaded[name]
    if split is not None:
        raise ValueError(f"{flag} {split!r}: {source} holds a single split (no split names)")
    return loaded


def _class_label_names(dataset: Any, column: str) -> tuple[str, ...] | None:
    import datasets

    feature = dataset.features.get(column)
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names)
    return None


def read_dataset_rows(
    name: str, kind: str, split: str | None, eval_split: str | None, label_column: str
) -> Rows:
    """The rows of a ``save_to_disk`` folder (``kind="saved"``) or a hub dataset (``"hub"``).

    ``split`` names the training split (default ``train``), ``eval_split`` an evaluation
    split; both must exist. A single saved ``Dataset`` has no split names, so neither may be
    given for it.

    Raises:
        ValueError: datasets is not installed, the hub cannot be reached, a missing split
            (the message lists the splits), or a split given for a single-split dataset.
    """
    datasets = _require_datasets(f"--data {name!r}")
    if kind == "saved":
        loaded = datasets.load_from_disk(str(Path(name).expanduser()))
        source = f"the saved dataset {name!r}"
    else:
        reason = hub_unreachable()
        if reason is not None:
            raise ValueError(
                f"--data {name!r} would come from the Hugging Face hub, but {reason}; save it "
                "elsewhere with datasets' save_to_disk and pass the folder"
            )
        try:
            loaded = datasets.load_dataset(name)
        except Exception as error:  # datasets raises many types; report the first line
            raise ValueError(
                f"--data {name!r} could not be loaded from the hub: "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
            ) from None
        source = f"the hub dataset {name!r}"
    train = _pick_split(loaded, split, "--split", source)
    evaluation = _pick_split(loaded, eval_split, "--eval-split", source) if eval_split else None
    return Rows(
        train=train.to_list(),
        evaluation=evaluation.to_list() if evaluation is not None else None,
        label_names=_class_label_names(train, label_column),
    )
