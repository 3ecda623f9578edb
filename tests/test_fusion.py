"""Hybrid image + table MLP: the combination learns what neither input alone can."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from stylegen.errors import DataError
from stylegen.heads import MLPHead, load_head, save_head


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Tiny problems: extra BLAS/OpenMP threads only spin-wait (20x slower on a busy 2-core box)."""
    with threadpool_limits(1):
        yield


def xor_data(n: int, seed: int) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Class = XOR(sign in the image vector, sign in the table's ``tempo`` column)."""
    rng = np.random.default_rng(seed)
    image_sign, table_sign = rng.choice([-1, 1], n), rng.choice([-1, 1], n)
    X = rng.normal(size=(n, 16))
    X[:, 0] += 2.5 * image_sign
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    table = pd.DataFrame({
        "tempo": 120 + 20 * table_sign + rng.normal(scale=5, size=n),
        "year": rng.normal(1990, 15, n),
        "constant": np.full(n, 7.0),
        "plays": rng.normal(scale=1000, size=n),
    })
    y = np.where(image_sign == table_sign, "same", "different").astype(object)
    return X.astype(np.float32), table, y


def mlp(mode: str, **kw) -> MLPHead:
    params = {"hidden": (32,), "tabular_hidden": (16,), "dropout": 0.1, "lr": 3e-3,
              "batch_size": 64, "max_epochs": 100, "patience": 15, "num_threads": 1, "mode": mode}
    return MLPHead(**{**params, **kw})


@pytest.fixture(scope="module")
def data():
    return xor_data(600, seed=0), xor_data(400, seed=1)


def test_hybrid_beats_each_input_alone(data):
    (X, table, y), (X_test, table_test, y_test) = data
    accuracy = {}
    for mode in ("image", "tabular", "hybrid"):
        images, images_test = (None, None) if mode == "tabular" else (X, X_test)
        head = mlp(mode).fit(images, y, tabular=table)
        accuracy[mode] = np.mean(head.predict(images_test, tabular=table_test) == y_test)
    assert accuracy["hybrid"] > 0.85, accuracy
    assert accuracy["hybrid"] > max(accuracy["image"], accuracy["tabular"]) + 0.25, accuracy


def test_table_statistics_come_from_training_rows_only(data):
    (X, table, y), _ = data
    train = np.arange(len(X)) < 400
    shifted = table.copy()
    shifted.loc[~train, "year"] += 100.0  # held-out rows from another era
    head = mlp("hybrid", max_epochs=2).fit(X[train], y[train], tabular=shifted[train])
    np.testing.assert_allclose(head.mean_, shifted[train].mean().to_numpy())
    assert not np.allclose(head.mean_, shifted.mean().to_numpy())
    train_std = shifted[train].std(ddof=0).to_numpy()
    np.testing.assert_allclose(head.scale_[[0, 1, 3]], train_std[[0, 1, 3]])
    assert head.scale_[2] == 1.0  # the constant column is not divided by zero
    assert head.tabular_columns_ == ["tempo", "year", "constant", "plays"]
    assert np.isfinite(head.predict_proba(X[~train], tabular=shifted[~train])).all()


def test_table_columns_are_checked(data):
    (X, table, y), _ = data
    head = mlp("hybrid", max_epochs=2).fit(X, y, tabular=table)
    reordered = table[["plays", "constant", "year", "tempo"]]
    np.testing.assert_array_equal(head.predict_proba(X, tabular=reordered),
                                  head.predict_proba(X, tabular=table))
    with pytest.raises(DataError, match="lacks columns.*tempo"):
        head.predict_proba(X, tabular=table.drop(columns="tempo"))
    with pytest.raises(DataError, match="3 columns.*4"):
        head.predict_proba(X, tabular=table.to_numpy()[:, :3])
    with pytest.raises(DataError, match="rows"):
        head.predict_proba(X, tabular=table.iloc[:10])
    with pytest.raises(DataError, match="needs a tabular"):
        head.predict_proba(X)
    with pytest.raises(DataError, match="numeric"):
        mlp("tabular").fit(None, y, tabular=table.assign(tempo="fast"))
    with pytest.raises(DataError, match="finite"):
        mlp("tabular").fit(None, y, tabular=table.assign(year=np.nan))
    with pytest.raises(DataError, match="mode"):
        mlp("audio").fit(X, y)
    head.fit(X, y, tabular=table.to_numpy())  # refitting forgets the earlier column names
    assert not hasattr(head, "tabular_columns_")


def test_hybrid_head_round_trips(data, tmp_path):
    (X, table, y), (X_test, table_test, _) = data
    head = mlp("hybrid", max_epochs=3).fit(X, y, tabular=table)
    loaded = load_head(save_head(head, tmp_path / "hybrid.npz", feature_id="f", pickle=True))
    np.testing.assert_array_equal(loaded.predict_proba(X_test, tabular=table_test),
                                  head.predict_proba(X_test, tabular=table_test))
