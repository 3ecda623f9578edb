"""Near-duplicate groups by vector similarity alone (``--no-verify``): planted copies in small
indexes written from raw vectors (no model), the CLI, and on real covers a few altered copies
embedded with the real backbone. Verification by local features: tests/test_verify.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from stylegen.apps.cli import app
from stylegen.apps.duplicates import (
    DEFAULT_THRESHOLD,
    find_duplicates,
    group_pairs,
    knn_pairs,
    range_pairs,
)
from stylegen.index.store import Index
from tests.conftest import COVERS_CSV, embed_tiny, make_image, needs_real_data, write_index


def planted_raw(rng: np.random.Generator, n: int, copies: dict[int, int], noise: float = 0.02):
    """``n`` random covers, then ``copies[i]`` slightly perturbed copies of cover ``i``."""
    raw = {p: rng.normal(size=(n, 40)).astype(np.float32) for p in ("style", "content")}
    extra = [i for i, c in copies.items() for _ in range(c)]
    for p in raw:
        raw[p] = np.concatenate([raw[p], raw[p][extra] + rng.normal(0, noise, (len(extra), 40))]).astype(np.float32)
    return raw, extra


def meta(n: int, prefix: str = "c") -> pd.DataFrame:
    names = [f"{prefix}{i}.png" for i in range(n)]
    return pd.DataFrame({"image": names, "path": names, "content_hash": [f"{prefix}{i}" for i in range(n)]})


def test_planted_copies_form_exactly_their_groups(tmp_path: Path, rng):
    raw, extra = planted_raw(rng, 60, {0: 3, 7: 1})
    write_index(tmp_path / "idx", raw, meta(len(extra) + 60), dims=16)
    index = Index.open(tmp_path / "idx")
    dups = find_duplicates(index)
    assert [sorted(g.tolist()) for g in dups.groups] == [[0, 60, 61, 62], [7, 63]]
    assert dups.method == "range" and (dups.pairs["a"] < dups.pairs["b"]).all()
    assert len(dups.pairs) == 6 + 1  # all pairs within each group, each once
    assert dups.pairs["similarity"].min() >= DEFAULT_THRESHOLD
    # a threshold above every copy's similarity finds nothing
    assert find_duplicates(index, threshold=0.99999).groups == []


def test_knn_search_finds_the_same_pairs_as_range_search(rng):
    import faiss

    x = rng.normal(size=(300, 12)).astype(np.float32)
    x[100:110] = x[:10] + 0.01 * rng.normal(size=(10, 12))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    base = faiss.IndexFlatIP(12)
    base.add(x)
    r = {(int(a), int(b)) for a, b, _ in zip(*range_pairs(x, base, 0.95), strict=True) if a != b}
    k = {(int(a), int(b)) for a, b, _ in zip(*knn_pairs(x, base, 0.95, k=5), strict=True) if a != b}
    assert r == k and {(i, i + 100) for i in range(10)} <= r


def test_group_pairs_joins_chains():
    groups = group_pairs(8, np.array([0, 1, 5]), np.array([1, 2, 6]))
    assert [g.tolist() for g in groups] == [[0, 1, 2], [5, 6]]


def test_against_reprojects_the_other_collection(tmp_path: Path, rng):
    """Two collections with separately fitted compressions: the copies across them are found,
    the pairs inside one collection are not reported."""
    raw_a, _ = planted_raw(rng, 50, {3: 1})  # a copy inside collection A (row 50)
    raw_b = {p: rng.normal(size=(30, 40)).astype(np.float32) for p in raw_a}
    for p in raw_b:
        raw_b[p][[4, 9]] = raw_a[p][[3, 20]] + rng.normal(0, 0.02, (2, 40))
    write_index(tmp_path / "a", raw_a, meta(51, "a"), dims=16)
    write_index(tmp_path / "b", raw_b, meta(30, "b"), dims=16)
    a, b = Index.open(tmp_path / "a"), Index.open(tmp_path / "b")
    assert a.feature_id != b.feature_id
    dups = find_duplicates(a, against=b)
    assert set(zip(dups.pairs["a"], dups.pairs["b"], strict=True)) == {(3, 4), (50, 4), (20, 9)}
    assert [sorted(g.tolist()) for g in dups.groups] == [[3, 50, 51 + 4], [20, 51 + 9]]


def test_against_reads_raw_features_from_the_ingest_shards(tmp_path: Path):
    """Indexes made by `embed` keep raw features in shards, not in the snapshot."""
    for name, seeds in (("a", range(12)), ("b", range(12, 20))):
        folder = tmp_path / name
        rows = [{"image": make_image(folder / f"{s}.png", kind=s % 4, seed=s).name, "genre": "x"} for s in seeds]
        if name == "b":  # a copy of a's cover 3 under another name
            (folder / "copy.png").write_bytes((tmp_path / "a" / "3.png").read_bytes())
            rows.append({"image": "copy.png", "genre": "x"})
        pd.DataFrame(rows).to_csv(folder / "covers.csv", index=False)
        embed_tiny(folder / "covers.csv", tmp_path / f"idx_{name}")
    a, b = Index.open(tmp_path / "idx_a"), Index.open(tmp_path / "idx_b")
    assert a.feature_id != b.feature_id and not list(b.snapshot.glob("raw_*.npy"))
    copy = int(np.flatnonzero(b.metadata["image"].str.endswith("copy.png"))[0])
    dups = find_duplicates(a, against=b, threshold=0.99)  # tiny PCA: look-alikes pair up too
    sims = {(int(i), int(j)): s for i, j, s in dups.pairs[["a", "b", "similarity"]].itertuples(index=False)}
    assert sims[(3, copy)] > 0.99999 and max(sims, key=sims.get) == (3, copy)


def test_cli_writes_csv_and_html_and_refuses_a_bad_threshold(tmp_path: Path, rng):
    raw, _ = planted_raw(rng, 40, {2: 2})
    write_index(tmp_path / "idx", raw, meta(42), dims=16)
    runner = CliRunner()
    out = runner.invoke(app, ["duplicates", "--index", str(tmp_path / "idx"), "--no-verify", "--csv", str(tmp_path / "d.csv"),
                              "--html", str(tmp_path / "d.html")])
    assert out.exit_code == 0, out.output
    assert "1 groups of near-duplicates (3 covers, 3 pairs)" in out.output
    table = pd.read_csv(tmp_path / "d.csv")
    assert table["id"].tolist() == [2, 40, 41] and set(table["group"]) == {1}
    assert (tmp_path / "d.html").read_text().count("<figure>") == 3
    bad = runner.invoke(app, ["duplicates", "--index", str(tmp_path / "idx"), "--no-verify", "--threshold", "1.5"])
    assert bad.exit_code != 0 and "threshold" in str(bad.exception or bad.output)


@pytest.mark.realdata
@needs_real_data()
def test_altered_real_covers_are_found(tmp_path: Path):
    """24 real covers + altered copies of 6 (JPEG q15, white border, sticker, grayscale).

    The compression is fitted on these 48 images only, so similarities are on a lower scale
    than in a collection of thousands (see README): the threshold here is 0.4, not the default.
    """
    import sys

    import stylegen

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_duplicates import ALTERATIONS

    covers = pd.read_csv(COVERS_CSV).sample(24, random_state=1).reset_index(drop=True)
    rows = [{"image": str(COVERS_CSV.parent / c), "family": c} for c in covers["image"]]
    from PIL import Image

    for i, c in enumerate(covers["image"][:6]):
        im = Image.open(COVERS_CSV.parent / c).convert("RGB")
        for name in ("jpeg15", "border", "sticker", "gray"):
            path = tmp_path / f"{i}_{name}.jpg"
            ALTERATIONS[name](im, np.random.default_rng(i)).save(path, quality=15 if name == "jpeg15" else 92)
            rows.append({"image": str(path), "family": c})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    stylegen.embed(tmp_path / "m.csv", tmp_path / "idx", workers=0, progress=False)
    index = Index.open(tmp_path / "idx")
    family = index.metadata["family"].to_numpy()
    is_copy = index.metadata["image"].str.startswith(str(tmp_path)).to_numpy()
    original = {f: r for r, f in enumerate(family) if not is_copy[r]}
    dups = find_duplicates(index, threshold=0.4)
    pairs = set(zip(dups.pairs["a"], dups.pairs["b"], strict=True))
    true = family[dups.pairs["a"]] == family[dups.pairs["b"]]
    found = [(min(r, original[family[r]]), max(r, original[family[r]])) in pairs for r in np.flatnonzero(is_copy)]
    assert len(found) == 24 and true.mean() >= 0.95  # precision of the found pairs
    assert np.mean(found) >= 0.8  # at least 80% of the (original, copy) pairs are found
    assert sum(len(set(family[g])) == 1 for g in dups.groups) >= 5  # groups are families


def test_cli_json(tmp_path: Path, rng):
    import json

    raw, _ = planted_raw(rng, 30, {4: 1})
    write_index(tmp_path / "idx", raw, meta(31), dims=16)
    out = CliRunner().invoke(app, ["duplicates", "--index", str(tmp_path / "idx"), "--no-verify", "--json"])
    assert out.exit_code == 0, out.output
    groups = json.loads(out.output)["groups"]
    assert [[m["id"] for m in g] for g in groups] == [[4, 30]]
