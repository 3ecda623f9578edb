"""Genres for a music library: scan albums' art, suggest genres, write tags safely, undo."""
