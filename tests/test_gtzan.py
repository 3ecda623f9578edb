"""Hybrid image + tabular genre model: GTZAN spectrograms + audio features, and table errors.

The real-data test embeds a stratified subset of GTZAN (20 clips per genre) and scores the
image-only, tabular-only and hybrid MLPs of ``stylegen evaluate --cv`` on the same stratified
folds (the full 790-clip comparison is docs/results_gtzan.md).
The unit tests build a tiny index from generated images and check that a bad cell of the
table is one line naming its row and column, from ``classify`` and ``evaluate``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

import stylegen
from stylegen.evaluation.runs import _cv_tabular
from stylegen.heads.train import artist_groups, labelled_rows, train
from stylegen.sources.tabular import load_tabular
from tests.conftest import GTZAN_CSV, embed_tiny, needs_real_data, planted_rows

FEATURES = "chroma_stft_mean:mfcc20_var"  # the 57 audio features, in the table's order


@pytest.mark.realdata
@needs_real_data(GTZAN_CSV)
def test_gtzan_hybrid_cv_on_a_stratified_subset(tmp_path):
    table = pd.read_csv(GTZAN_CSV)
    subset = table.groupby("genre").sample(20, random_state=0)
    subset = subset.assign(image=[str(GTZAN_CSV.parent / p) for p in subset["image"]])
    subset.to_csv(tmp_path / "subset.csv", index=False)
    stylegen.embed(tmp_path / "subset.csv", tmp_path / "idx", workers=0, progress=False)
    index = stylegen.Index.open(tmp_path / "idx")
    assert len(index) >= 195  # GTZAN holds a few byte-identical clips; they are indexed once
    tab, cols = load_tabular(index.metadata, columns=[FEATURES])  # metadata cells are strings
    assert len(cols) == 57 and "length" not in cols and tab.dtype == np.float32
    rows, y = labelled_rows(index.metadata, "single")
    groups = artist_groups(index.metadata)[rows]  # no artist column: one group per clip
    with threadpool_limits(1):  # one net per variant instead of five, to stay fast
        results = _cv_tabular(index, rows, y, groups, tab, 5, 0, mlp_params={"n_models": 1})
    assert list(results) == ["mlp-image", "mlp-tabular", "mlp-hybrid"]
    f1 = {k.removeprefix("mlp-"): m["macro_f1"] for k, m in results.items()}
    for m in results.values():  # 5 folds of about 40 clips, each clip scored once
        assert len(m["folds"]["n"]) == 5 and min(m["folds"]["n"]) >= 38 and m["n"] == len(index)
        assert sum(m["folds"]["n"]) == len(index)
    # Chance is 0.10. On 790 clips (docs/results_gtzan.md) the hybrid reaches about 0.78 and
    # each input alone 0.70-0.73; on 160 training clips a single hybrid net is data-starved and
    # does not reliably beat the image-only net (0.44-0.55 here), so only "well above chance"
    # is asserted for each variant.
    assert min(f1.values()) > 0.3, f1
    assert results["mlp-hybrid"]["accuracy"] > 0.3, f1


GENRES = ["jazz", "metal", "pop"]


@pytest.fixture(scope="module")
def hybrid_index(tmp_path_factory) -> tuple[Path, Path]:
    """An index of 3 genres x 6 generated images with a hybrid MLP head, and its feature table."""
    root = tmp_path_factory.mktemp("hybrid")
    manifest = pd.DataFrame(planted_rows(root, GENRES, 6, lambda g, i: {"tempo": 90.0 + 30 * g + i,
                                                                         "loud": -10.0 + g}))
    manifest[["image", "genre"]].to_csv(root / "train.csv", index=False)
    manifest[["image", "tempo", "loud"]].to_csv(root / "features.csv", index=False)
    embed_tiny(root / "train.csv", root / "idx")
    index = stylegen.Index.open(root / "idx")
    tab, cols = load_tabular(index.metadata, table=root / "features.csv")
    with threadpool_limits(1):
        train(root / "idx", heads=("mlp", "knn"), tabular=tab, tabular_columns=cols, validate=False)
    return root, root / "idx"


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``stylegen ARGS`` in-process through the real entry point: (exit code, stdout, stderr)."""
    from stylegen.apps.cli import main

    def run(*args: str) -> SimpleNamespace:
        monkeypatch.setattr(sys, "argv", ["stylegen", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


def test_classify_with_table_uses_the_trained_columns(hybrid_index, cli):
    root, idx = hybrid_index
    extra = pd.read_csv(root / "features.csv").assign(year=2000)  # a column the head never saw
    extra.to_csv(root / "extra.csv", index=False)
    r = cli("classify", str(root / "img" / "pop5.png"), "--index", str(idx), "--method", "head",
            "--tabular", str(root / "extra.csv"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(root / "img" / "pop5.png"))
    r = cli("classify", str(root / "img" / "pop5.png"), "--index", str(idx), "--method", "head")
    assert r.returncode != 0 and "needs tabular columns: tempo, loud" in r.stderr


@pytest.mark.parametrize("command", ["classify", "evaluate"])
@pytest.mark.parametrize(("cell", "message"), [(None, "missing value at manifest row {row} "),
                                               ("fast", "non-numeric value 'fast' at manifest row {row} ")])
def test_bad_table_cell_is_one_line_naming_row_and_column(hybrid_index, cli, tmp_path, command, cell, message):
    root, idx = hybrid_index
    table = pd.read_csv(root / "features.csv").astype({"tempo": object})
    table.loc[table["image"] == "img/metal2.png", "tempo"] = cell
    table.to_csv(tmp_path / "bad.csv", index=False)
    if command == "classify":  # rows are the images given on the command line
        args, row = [str(root / "img" / "jazz0.png"), str(root / "img" / "metal2.png")], 1
    else:  # rows are the index rows
        args, row = ["--cv", "2"], int(np.flatnonzero(stylegen.Index.open(idx).metadata["image"] == "img/metal2.png")[0])
    r = cli(command, *args, "--index", str(idx), "--tabular", str(tmp_path / "bad.csv"),
            "--tabular-columns", "tempo,loud")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message.format(row=row) in r.stderr and "metal2.png" in r.stderr and "column 'tempo'" in r.stderr
