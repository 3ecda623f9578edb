"""Helpers every stage may use: atomic writes and versioned folders, progress, numerics.

Nothing here imports another part of stylegen but :mod:`stylegen.errors`."""
