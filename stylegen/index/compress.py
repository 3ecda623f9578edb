"""Per-part compression fitted on the collection: PCA (optionally whitened),
Gaussian random projection, or none. Stored as plain arrays (``.npz``), never
pickled, so an index opens with any scikit-learn version.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stylegen.config import CompressionConfig
from stylegen.util.numeric import compact, half_exact, matmul


@dataclass(frozen=True)
class Projection:
    """y = (x - mean) @ components.T / scale for one part."""

    mean: np.ndarray  # (d_in,)
    components: np.ndarray  # (d_out, d_in)
    scale: np.ndarray  # (d_out,)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return matmul(x - self.mean, self.components.T) / self.scale


def fit_projection(x: np.ndarray, method: str, dim: int, whiten: bool, seed: int,
                   overwrite: bool = False) -> Projection:
    """Fit one part's projection on the collection's raw vectors ``x`` (n, d_in).

    ``overwrite``: PCA may centre a float32 ``x`` in place instead of copying it (the same
    result; a build's fitting sample, up to 100,000 x 17,824 floats, is not held twice)."""
    x = np.asarray(x, dtype=np.float32)
    n, d_in = x.shape
    if method == "none" or (method == "rp" and dim >= d_in) or (method == "pca" and n < 2):
        return Projection(np.zeros(d_in, np.float32), np.eye(d_in, dtype=np.float32), np.ones(d_in, np.float32))
    if method == "rp":
        from sklearn.random_projection import GaussianRandomProjection

        rp = GaussianRandomProjection(n_components=dim, random_state=seed).fit(x[:1])
        comps = half_exact(rp.components_)
        return Projection(np.zeros(d_in, np.float32), comps, np.ones(dim, np.float32))
    from sklearn.decomposition import PCA

    k = max(1, min(dim, n - 1, d_in))
    pca = PCA(n_components=k, svd_solver="randomized" if k < 0.8 * min(n, d_in) else "full",
              random_state=seed, copy=not overwrite).fit(x)
    scale = np.sqrt(pca.explained_variance_) if whiten else np.ones(k)
    return Projection(
        pca.mean_.astype(np.float32), half_exact(pca.components_),  # components: 256 x 17,824 for style
        np.maximum(scale, 1e-8).astype(np.float32),
    )


@dataclass(frozen=True)
class Compressor:
    """The fitted projections of every part, in part order."""

    parts: dict[str, Projection]

    @classmethod
    def fit(cls, raw: dict[str, np.ndarray], config: CompressionConfig, overwrite: bool = False) -> Compressor:
        """Fit every part (``overwrite``: ``raw``'s arrays may be used as scratch space)."""
        return cls({
            part: fit_projection(x, config.method, config.dims.get(part, 256), config.whiten, config.seed, overwrite)
            for part, x in raw.items()
        })

    def transform(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {part: proj.transform(raw[part]) for part, proj in self.parts.items()}

    @property
    def dims(self) -> dict[str, int]:
        return {part: p.dim for part, p in self.parts.items()}

    def save(self, path: Path) -> None:
        arrays = {f"{part}.{name}": compact(getattr(p, name)) if name == "components" else getattr(p, name)
                  for part, p in self.parts.items() for name in ("mean", "components", "scale")}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> Compressor:
        with np.load(path, allow_pickle=False) as z:
            names = sorted({k.split(".")[0] for k in z.files}, key=lambda p: ("style", "content").index(p))
            return cls({p: Projection(z[f"{p}.mean"], z[f"{p}.components"].astype(np.float32), z[f"{p}.scale"])
                        for p in names})


def combine(parts: dict[str, np.ndarray], weights: dict[str, float]) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """Normalise each compressed part, scale it by its weight, concatenate and normalise.

    Returns the (n, D) float32 vectors and each part's column slice ``[start, stop)``.
    Cosine similarity of two vectors is then the weight²-averaged cosine of their parts.
    """
    blocks, slices, start = [], {}, 0
    for part, x in parts.items():
        x = np.asarray(x, np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        blocks.append(x * float(weights.get(part, 1.0)))
        slices[part] = (start, start + x.shape[1])
        start += x.shape[1]
    v = np.concatenate(blocks, axis=1)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v.astype(np.float32), slices
