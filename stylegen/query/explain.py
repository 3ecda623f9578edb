"""Why a cover got its genre: the covers that carried the kNN vote, and the tap layers
that carry the prediction.

**Voters**: the labelled covers among the kNN head's neighbours of the query (the cover
itself left out when it is in the index), each with its weight in the vote
(softmax of similarity / temperature, as the head computes it) and its genre.

**Taps**: for each tap layer, the change in the probability of the predicted genre when that
tap's part of the style vector is *left out*. The compressed vector mixes the taps (PCA runs
over the whole style part), so the leave-out is done on the raw style vector, before
compression: the raw style part is the concatenation of one block per tap, of known size
c(c+1)/2 for c = min(channels, max_gram_channels), each L2-normalised and scaled
1/sqrt(#taps) (``features.style_vector``). The tap's block is replaced by its **collection
mean** (the compressor's stored mean of that block, i.e. "an average cover at this layer"),
then the vector is re-projected with the stored compressor, combined with the other parts
exactly like the index's vectors, and scored by the same head. ``delta`` = p(full) −
p(without the tap); ``share`` = the tap's positive delta over the sum of positive deltas
(0 for every tap when none is positive). Replacing by the mean, rather than zeroing, keeps
the vector near the data the heads were trained on (a zero block is far from any cover).
Everything comes from stored data: a cover of the index has its raw part vectors read from
the ingest shards (:class:`stylegen.index.build.RawFeatures`), a new image the raw vectors of
its one forward pass, and the taps' widths are in the manifest (``backbone.tap_channels``,
recorded at ingest). Only an index made before widths were recorded has them probed once with
the torch network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stylegen.errors import StylegenError

MAX_VOTERS = 10


def tap_blocks(channels: Sequence[int], max_channels: int | None) -> list[tuple[int, int]]:
    """[start, stop) of each tap's block in the raw style vector."""
    out, start = [], 0
    for ch in channels:
        c = min(ch, max_channels) if max_channels else ch
        out.append((start, start + c * (c + 1) // 2))
        start = out[-1][1]
    return out


def tap_channels(engine: Any) -> list[int]:
    """Channels of each tap: from the manifest (recorded at ingest); an index made before
    they were recorded has them probed once with the torch network."""
    recorded = engine.index.manifest["backbone"].get("tap_channels")
    if recorded:
        return [int(c) for c in recorded]
    import torch

    from stylegen.featurize import backbones

    bb = backbones.build(engine.index.config.backbone)  # the torch network, whatever runtime serves queries
    size = bb.image_size
    with torch.inference_mode():
        acts, _ = bb.forward(torch.zeros((1, 3, size, size)))
    return [int(a.shape[1]) for a in acts.values()]


def leave_out_vectors(engine: Any, raw: dict[str, np.ndarray], blocks: list[tuple[int, int]]) -> np.ndarray:
    """(#taps, dim) index vectors of one item, each with one tap's block set to the mean."""
    proj = engine.index.compressor.parts["style"]
    style = np.repeat(np.asarray(raw["style"], np.float32).reshape(1, -1), len(blocks), axis=0)
    if style.shape[1] != blocks[-1][1]:
        raise StylegenError(f"the raw style vector has {style.shape[1]} values, the taps' blocks {blocks[-1][1]}")
    for t, (a, b) in enumerate(blocks):
        style[t, a:b] = proj.mean[a:b]
    parts = {p: (style if p == "style" else np.repeat(np.asarray(raw[p], np.float32).reshape(1, -1), len(blocks), 0))
             for p in engine.index.compressor.parts}
    return engine.compress(parts)


def voters(engine: Any, vector: np.ndarray, row: int | None) -> list[dict[str, Any]]:
    """The labelled covers of the kNN vote with their weights, heaviest first."""
    from stylegen.errors import ModelNotFoundError
    from stylegen.heads.compiled import weights_of

    try:
        head = engine.head("knn")
    except ModelNotFoundError:
        return []
    knn = getattr(head, "knn_", head)
    sims, ids = knn.kneighbors(vector[None], exclude=engine.exclude_rows([row], 1))
    weights = weights_of(sims, ids >= 0, knn.temperature)[0]
    train_rows = engine.head_config["train_rows"]
    order = [j for j in np.argsort(-weights, kind="stable") if ids[0, j] >= 0][:MAX_VOTERS]
    cover_rows = [int(train_rows[int(ids[0, j])]) for j in order]
    meta = engine.index.rows(cover_rows)
    out = []
    for j, r, (_, m) in zip(order, cover_rows, meta.iterrows(), strict=True):
        target = knn.targets_[int(ids[0, j])]
        genre = knn.classes_[int(target)] if np.ndim(target) == 0 else "|".join(
            str(c) for c, on in zip(knn.classes_, target, strict=True) if on)
        out.append({"id": r, "genre": str(genre), "weight": round(float(weights[j]), 4),
                    "similarity": round(float(sims[0, j]), 4), "image": str(m.get("image")),
                    "artist": _text(m.get("artist")), "album": _text(m.get("album"))})
    return out


def explain(engine: Any, vector: np.ndarray, proba: np.ndarray, classes: list[str], method: str,
            row: int | None, raw: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """``{"genre", "method", "voters": [...], "taps": [{"tap", "delta", "share", ...}], "note"}``."""
    pred = int(np.argmax(proba))
    out: dict[str, Any] = {"genre": classes[pred], "method": method, "probability": round(float(proba[pred]), 4),
                           "voters": voters(engine, vector, row), "taps": []}
    if raw is None or "style" not in engine.index.compressor.parts:
        out["note"] = "no per-tap attribution: the index keeps no raw style vectors"
        return out
    taps = list(engine.index.manifest["backbone"]["taps"])
    blocks = tap_blocks(tap_channels(engine), engine.index.config.features.max_gram_channels)
    if len(blocks) != len(taps):
        raise StylegenError(f"{len(taps)} taps but {len(blocks)} channel counts")
    left_out = leave_out_vectors(engine, raw, blocks)
    p_without, _, _ = engine.predict_proba(left_out, method, rows=[row] * len(taps))
    deltas = float(proba[pred]) - p_without[:, pred]
    positive = np.maximum(deltas, 0)
    shares = positive / positive.sum() if positive.sum() > 0 else np.zeros_like(positive)
    out["taps"] = [{"tap": t, "delta": round(float(d), 4), "share": round(float(s), 4),
                    "probability_without": round(float(pw), 4)}
                   for t, d, s, pw in zip(taps, deltas, shares, p_without[:, pred], strict=True)]
    return out


def format_explanation(e: dict[str, Any], width: int = 30) -> str:
    """Text bars: each tap's share, then the heaviest voters."""
    lines = [f"  why {e['genre']} ({e['probability']:.2f}, {e['method']}):"]
    for t in e["taps"]:
        bar = "█" * round(width * t["share"])
        lines.append(f"    tap {t['tap']:<10} {bar:<{width}} share {t['share']:.2f}  "
                     f"p without it {t['probability_without']:.2f} ({-t['delta']:+.2f})")
    if e.get("note"):
        lines.append(f"    {e['note']}")
    for v in e["voters"][:5]:
        who = " – ".join(x for x in (v["artist"], v["album"]) if x) or v["image"]
        lines.append(f"    voter #{v['id']:<6} {v['genre']:<12} weight {v['weight']:.2f}  sim {v['similarity']:.2f}  {who}")
    return "\n".join(lines)


def _text(v: Any) -> str | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) or v == "" else str(v)
