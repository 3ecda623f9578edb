"""A benchmark corpus whose neighbour structure matches real cover vectors, at any size.

    python scripts/realistic_corpus.py --index indexes/merged          # fit, then the check table

The old recipe of ``bench_scale.py`` (``--data noisy``) draws every vector as one real vector
plus a little Gaussian noise: 4,844 tight clusters, which flatter IVF-PQ and graphs alike
(issue 23). This generator is fitted to the real vectors instead:

* **anchors**: ``base`` real vectors (the index's, minus held-out check queries); each anchor's
  ``K`` nearest real neighbours are found once;
* **a new vector** is ``a + t·(b - a) + σ·L·ε``, renormalised: ``a`` a random anchor, ``b`` one of
  its ``K`` nearest real neighbours, ``t ~ U(0, 1)`` (a point between two real covers that are
  alike, as a new cover of the same look would be), ``ε ~ N(0, I)`` and ``L`` the Cholesky
  factor of the real vectors' covariance (the spread of real covers, in their own directions);
* ``σ`` is **fitted**: the value whose 1st- and 10th-nearest-neighbour similarity distributions
  of held-out synthetic queries, at the real collection's size, are closest to those of
  held-out real covers (sum of the two Kolmogorov–Smirnov distances).

The check (:func:`neighbour_profile`) compares real held-out covers, the old recipe and this
generator at the same size; ``docs/scale.md`` has the table. Nothing here imports the package's
``__init__`` (torch): ``bench_scale.py`` runs it in small processes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

K_NEIGHBOURS = 10
SIGMAS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


@dataclass
class NeighbourMix:
    """The fitted generator: anchors, their neighbour lists, the covariance factor and σ."""

    anchors: np.ndarray  # (m, d) float32 unit rows
    neighbours: np.ndarray  # (m, K) int: each anchor's nearest other anchors
    chol: np.ndarray  # (d, d) float32
    sigma: float

    def sample(self, n: int, seed: int, out: Path | None = None, dtype: str = "float32",
               chunk: int = 100_000) -> np.ndarray:
        """``n`` unit vectors (written to ``out`` as a .npy of ``dtype`` when given)."""
        rng = np.random.default_rng(seed)
        d = self.anchors.shape[1]
        x = (np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=(n, d)) if out
             else np.empty((n, d), dtype))
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            i = rng.integers(0, len(self.anchors), b - a)
            j = self.neighbours[i, rng.integers(0, self.neighbours.shape[1], b - a)]
            t = rng.random((b - a, 1), dtype=np.float32)
            v = self.anchors[i] + t * (self.anchors[j] - self.anchors[i])
            if self.sigma:
                v += self.sigma * (rng.standard_normal((b - a, d), dtype=np.float32) @ self.chol.T)
            x[a:b] = v / np.linalg.norm(v, axis=1, keepdims=True)
        if out:
            x.flush()
            del x
            return np.load(out, mmap_mode="r")
        return x


def noisy_copies(real: np.ndarray, noise: float) -> NeighbourMix:
    """The old recipe (``bench_scale.py --data noisy``): a real vector + noise·L·ε, renormalised
    (each anchor its own only neighbour)."""
    return NeighbourMix(real, np.arange(len(real))[:, None], covariance_factor(real), noise)


def covariance_factor(real: np.ndarray) -> np.ndarray:
    cov = np.cov(real, rowvar=False).astype(np.float64)
    return np.linalg.cholesky(cov + 1e-6 * np.eye(cov.shape[0])).astype(np.float32)


def top_k(base: np.ndarray, queries: np.ndarray, k: int, skip_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product (similarities, rows) of each query's ``k`` nearest rows of ``base``,
    best first; ``skip_self``: query ``i`` is row ``i`` of ``base`` and is left out."""
    sims, ids = [], []
    for a in range(0, len(queries), 1024):
        s = queries[a:a + 1024] @ base.T
        if skip_self:
            s[np.arange(len(s)), np.arange(a, a + len(s))] = -np.inf
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
        ids.append(np.take_along_axis(part, order, 1))
        sims.append(np.take_along_axis(s, ids[-1], 1))
    return np.concatenate(sims), np.concatenate(ids)


def neighbour_profile(base: np.ndarray, queries: np.ndarray) -> dict[str, np.ndarray]:
    """The 1st and 10th nearest-neighbour similarity of each query in ``base``."""
    top, _ = top_k(base, queries, 10)
    return {"sim@1": top[:, 0], "sim@10": top[:, 9]}


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov distance."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def fit(real: np.ndarray, n_check: int = 500, seed: int = 0,
        sigmas: tuple[float, ...] = SIGMAS) -> tuple[NeighbourMix, dict]:
    """Fit σ on ``real`` (unit rows): hold out ``n_check`` real covers as queries, make a synthetic
    collection of the same size as the rest and synthetic queries, and keep the σ whose
    neighbour profile is closest to the real one. Returns the generator (anchored on all the
    real vectors) and the check: profiles and KS distances per candidate."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(real), bool)
    held[rng.choice(len(real), n_check, replace=False)] = True
    base, queries = real[~held], real[held]
    target = neighbour_profile(base, queries)
    chol = covariance_factor(base)
    nbrs = top_k(base, base, K_NEIGHBOURS, skip_self=True)[1]
    check: dict = {"real": _summary(target), "n_base": int(len(base)), "n_queries": int(n_check), "candidates": {}}
    noisy = noisy_copies(base, 0.5)
    old = neighbour_profile(noisy.sample(len(base), 1), noisy.sample(n_check, 2))
    check["noisy copies (old recipe, noise 0.5)"] = {**_summary(old), **_distance(old, target)}
    best = None
    for sigma in sigmas:
        gen = NeighbourMix(base, nbrs, chol, sigma)
        prof = neighbour_profile(gen.sample(len(base), 1), gen.sample(n_check, 2))
        dist = _distance(prof, target)
        check["candidates"][f"{sigma:g}"] = {**_summary(prof), **dist}
        if best is None or dist["ks_sum"] < best[1]:
            best = (sigma, dist["ks_sum"])
    check["sigma"] = best[0]
    full = NeighbourMix(real, top_k(real, real, K_NEIGHBOURS, skip_self=True)[1], covariance_factor(real), best[0])
    return full, check


def _summary(p: dict[str, np.ndarray]) -> dict[str, list[float]]:
    return {k: [round(float(q), 3) for q in np.percentile(v, [5, 25, 50, 75, 95])] for k, v in p.items()}


def _distance(p: dict[str, np.ndarray], target: dict[str, np.ndarray]) -> dict[str, float]:
    d = {f"ks {k}": round(ks(p[k], target[k]), 3) for k in target}
    return {**d, "ks_sum": round(sum(d.values()), 3)}


def real_vectors(index: Path) -> np.ndarray:
    snap = index / (index / "CURRENT").read_text().strip()
    return np.load(snap / "vectors.npy").astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", type=Path, default=Path("indexes/merged"))
    p.add_argument("--out", type=Path, default=None, help="write the check as JSON here")
    args = p.parse_args()
    _, check = fit(real_vectors(args.index))
    print(f"real: {check['n_base']} base covers, {check['n_queries']} held-out queries; percentiles 5/25/50/75/95")
    rows = [("real covers (held out)", check["real"])]
    rows.append(("noisy copies (old recipe)", check["noisy copies (old recipe, noise 0.5)"]))
    rows += [(f"neighbour mix σ={s}", c) for s, c in check["candidates"].items()]
    print("| corpus | sim@1 | sim@10 | KS sim@1 | KS sim@10 |\n|---|---|---|---|---|")
    for name, c in rows:
        print(f"| {name} | {' / '.join(f'{x:.2f}' for x in c['sim@1'])} | {' / '.join(f'{x:.2f}' for x in c['sim@10'])} "
              f"| {c.get('ks sim@1', 0):.3f} | {c.get('ks sim@10', 0):.3f} |")
    print(f"fitted σ = {check['sigma']}")
    if args.out:
        args.out.write_text(json.dumps(check, indent=1))


if __name__ == "__main__":
    main()
