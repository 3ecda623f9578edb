"""Exceptions that the CLI and the service turn into one-line messages.

Every error a user can cause by bad input derives from :class:`StylegenError`;
anything else reaching the top level is a bug.
"""

from __future__ import annotations


class StylegenError(Exception):
    """A user-facing error: its message is shown as one line, exit code ``exit_code``."""

    exit_code = 2


class SourceError(StylegenError):
    """The SOURCE of an embed run (folder or CSV manifest) cannot be used."""


class BadImageError(StylegenError):
    """One image cannot be decoded (corrupt, truncated, empty, too large, missing)."""


class IndexMismatchError(StylegenError):
    """An index was asked to serve a query embedded with other settings."""


class IndexNotFoundError(StylegenError):
    """No stylegen index at the given directory."""


class ModelNotFoundError(StylegenError):
    """A head or a backbone weight file that was asked for does not exist."""


class DataError(StylegenError):
    """Labels, tabular columns or other table input is missing or malformed."""


class UnknownCoverError(StylegenError):
    """No cover with this id in the index."""

    http_status = 404


class UnsupportedImageError(BadImageError):
    """The bytes are not an image format that can be read."""

    http_status = 415


class ImageTooLargeError(BadImageError):
    """The image has too many bytes or too many pixels."""

    http_status = 413
