"""Small dense algebra shared by the query path (compression, MLP heads), torch-free by default."""

from __future__ import annotations

import sys

import numpy as np


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in float32; on torch's thread pool when torch is already loaded.

    With torch serving the forward pass, a numpy (OpenBLAS) product between two forward passes
    leaves BLAS threads spinning against torch's, which made classifying one cover 10x slower
    (112 vs 11 ms). Without torch loaded (the exported runtimes) numpy does it: torch is
    never imported here.
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if "torch" not in sys.modules:
        return a @ b
    import torch

    return (torch.as_tensor(a) @ torch.as_tensor(b)).numpy()


def half_exact(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to float16 values, held as float32: what fitted parameters are rounded
    to so that they store in half the bytes, in an index and in a model bundle alike, with
    every vector computed from the stored values (nothing is lost when they are saved)."""
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def compact(a: np.ndarray) -> np.ndarray:
    """``a`` as float16 when that loses nothing (rounded at fit), else as it is."""
    a = np.asarray(a)
    if a.dtype == np.float32 and np.all(np.isfinite(a)):
        h = a.astype(np.float16)
        if np.array_equal(h.astype(np.float32), a):
            return h
    return a
