"""The choices and limits of a query, in one place for the engine, the CLI and the service
(imports nothing heavy: the CLI reads them at start-up)."""

from __future__ import annotations

from typing import Literal

METHODS = ("head", "knn", "ensemble")  # what predicts the genres: the trained head, kNN voting, both
BY = ("style", "content", "both")  # which part of the vectors similar covers are matched by

Method = Literal["head", "knn", "ensemble"]
By = Literal["style", "content", "both"]

DEFAULT_TOP = 3  # genres returned
MAX_TOP = 100
DEFAULT_K = 12  # similar covers returned
MAX_K = 200


def choices(values: tuple[str, ...]) -> str:
    """``a | b | c``, for help texts."""
    return " | ".join(values)
