"""Heads learn planted structure, honour scikit-learn's contract, and save/load exactly."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from stylegen.errors import DataError, IndexMismatchError, ModelNotFoundError
from stylegen.heads import (
    EnsembleHead,
    HierarchicalHead,
    KNNHead,
    LinearHead,
    MLPHead,
    load_head,
    load_predictor,
    read_head_info,
    save_head,
    vote,
    vote_multi,
)
from stylegen.sources.labels import Taxonomy

CLASSES = np.array(["country", "jazz", "metal", "rock"], dtype=object)
MEANS = np.random.default_rng(123).normal(size=(4, 32))
MEANS /= np.linalg.norm(MEANS, axis=1, keepdims=True)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Tiny problems: extra BLAS/OpenMP threads only spin-wait (20x slower on a busy 2-core box)."""
    with threadpool_limits(1):
        yield


def blobs(n: int, seed: int, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Normalised 32-d vectors around one of 4 class means, and their string labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    X = MEANS[y] + rng.normal(scale=noise, size=(n, 32))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), CLASSES[y]


def multi_blobs(n: int, seed: int) -> tuple[np.ndarray, list[list[str]]]:
    """Each item carries 1 or 2 labels; its vector is the sum of their means plus noise."""
    rng = np.random.default_rng(seed)
    sets = [rng.choice(4, size=rng.integers(1, 3), replace=False) for _ in range(n)]
    X = np.stack([MEANS[s].sum(0) for s in sets]) + rng.normal(scale=0.2, size=(n, 32))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), [sorted(CLASSES[s]) for s in sets]


def small_mlp(**kw) -> MLPHead:
    params = {"hidden": (64,), "max_epochs": 60, "patience": 10, "batch_size": 64, "num_threads": 1}
    return MLPHead(**{**params, **kw})


FACTORIES = {
    "linear": lambda ml: LinearHead(multi_label=ml),
    "mlp": lambda ml: small_mlp(multi_label=ml),
    "knn": lambda ml: KNNHead(k=10, multi_label=ml),
    "ensemble": lambda ml: EnsembleHead(LinearHead(multi_label=ml), KNNHead(multi_label=ml)),
}


@pytest.fixture(scope="module")
def data():
    return blobs(400, seed=0), blobs(300, seed=1)


@pytest.mark.parametrize("name", FACTORIES)
def test_single_label_heads_learn(name, data):
    (X, y), (X_test, y_test) = data
    head = FACTORIES[name](False)
    with pytest.raises(NotFittedError):
        check_is_fitted(head)
    assert head.fit(X, y) is head
    check_is_fitted(head)
    assert head.classes_.tolist() == CLASSES.tolist()
    proba = head.predict_proba(X_test)
    assert proba.shape == (len(X_test), 4)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    predicted = head.predict(X_test)
    np.testing.assert_array_equal(predicted, head.classes_[proba.argmax(1)])
    assert np.mean(predicted == y_test) > 0.85  # chance is 0.25
    assert clone(head).get_params().keys() == head.get_params().keys()


@pytest.mark.parametrize("name", FACTORIES)
def test_multi_label_heads_learn(name):
    X, y = multi_blobs(500, seed=0)
    X_test, y_test = multi_blobs(300, seed=1)
    head = FACTORIES[name](True).fit(X, y)
    proba = head.predict_proba(X_test)
    assert proba.shape == (len(X_test), 4) and ((proba >= 0) & (proba <= 1)).all()
    predicted = head.predict(X_test)
    hits = sum(len(set(p) & set(t)) for p, t in zip(predicted, y_test))
    n_pred, n_true = sum(map(len, predicted)), sum(map(len, y_test))
    f1 = 2 * hits / (n_pred + n_true)
    assert f1 > 0.8, f1
    assert np.mean([sorted(p) == t for p, t in zip(predicted, y_test)]) > 0.6


def test_mlp_is_seeded_and_leaves_global_rng_alone(data):
    (X, y), (X_test, _) = data
    state = torch.random.get_rng_state()
    first = small_mlp(max_epochs=5).fit(X, y).predict_proba(X_test)
    assert torch.equal(state, torch.random.get_rng_state())
    np.testing.assert_array_equal(first, small_mlp(max_epochs=5).fit(X, y).predict_proba(X_test))
    other = small_mlp(max_epochs=5, random_state=1).fit(X, y).predict_proba(X_test)
    assert not np.allclose(first, other)


def test_mlp_early_stopping_restores_best_epoch(data):
    (X, y), _ = data
    head = small_mlp(max_epochs=400, patience=3, lr=0.05).fit(X, y)
    assert head.n_epochs_ < 400
    assert head.n_epochs_ - 1 - head.best_epoch_ == 3
    assert head.history_[head.best_epoch_] == min(head.history_)


@pytest.mark.parametrize(("hidden", "n_table", "tabular_hidden"),
                         [((16, 8), 0, ()), ((), 0, ()), ((16,), 5, (4,)), ((16,), 5, ())])
def test_mlp_numpy_forward_equals_the_torch_network(hidden, n_table, tabular_hidden):
    from stylegen.heads._mlp_torch import Net, to_weights
    from stylegen.heads.compiled import forward

    torch.manual_seed(0)
    net = Net(32, n_table, 4, hidden, tabular_hidden, dropout=0.5).eval()
    rng = np.random.default_rng(0)
    image = rng.normal(size=(7, 32)).astype(np.float32)
    table = rng.normal(size=(7, n_table)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.as_tensor(image), torch.as_tensor(table)).numpy()
    np.testing.assert_allclose(forward(to_weights(net), image, table), expected, atol=1e-5)


def test_mlp_head_pickled_with_torch_networks_still_loads(data):
    """Heads saved before the numpy weights carried torch modules in ``nets_`` / ``net_``."""
    from stylegen.heads._mlp_torch import Net

    (X, y), (X_test, _) = data
    head = small_mlp(max_epochs=2).fit(X, y)
    torch.manual_seed(1)
    nets = [Net(32, 0, 4, (64,), (64,), 0.3).eval() for _ in range(2)]
    with torch.no_grad():
        expected = np.mean([torch.softmax(n(torch.as_tensor(X_test), torch.zeros(len(X_test), 0))
                                          .double(), dim=1).numpy() for n in nets], axis=0)
    for old in ({"nets_": nets, "net_": nets[0]}, {"net_": nets[0]}):
        state = {k: v for k, v in head.__dict__.items() if k != "weights_"} | old
        restored = MLPHead.__new__(MLPHead)
        restored.__setstate__(state)
        want = expected if "nets_" in old else np.mean(
            [torch.softmax(nets[0](torch.as_tensor(X_test), torch.zeros(len(X_test), 0)).double(),
                           dim=1).detach().numpy()], axis=0)
        np.testing.assert_allclose(restored.predict_proba(X_test), want, atol=1e-6)
        assert "nets_" not in restored.__dict__ and "net_" not in restored.__dict__


def test_saved_mlp_head_predicts_without_importing_torch(data, tmp_path):
    (X, y), (X_test, _) = data
    head = small_mlp(max_epochs=3).fit(X, y)
    save_head(head, tmp_path / "mlp.npz", pickle=True)
    np.save(tmp_path / "x.npy", X_test)
    code = ("import sys, numpy as np; from stylegen.heads import load_head; "
            f"h = load_head({str(tmp_path / 'mlp.npz')!r}); "
            f"np.save({str(tmp_path / 'p.npy')!r}, h.predict_proba(np.load({str(tmp_path / 'x.npy')!r}))); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), head.predict_proba(X_test), atol=1e-6)


def test_vote_arithmetic_by_hand():
    # weights = softmax([0.9, 0.8, 0.1] / 0.1) = e^9, e^8, e^1 over their sum
    total = math.exp(9) + math.exp(8) + math.exp(1)
    expected = [(math.exp(9) + math.exp(1)) / total, math.exp(8) / total, 0.0]
    proba = vote(np.array([[0.9, 0.8, 0.1]]), np.array([[0, 1, 0]]), n_classes=3, temperature=0.1)
    np.testing.assert_allclose(proba[0], expected, rtol=1e-12)
    # a missing neighbour (-1) is ignored; a row without neighbours is uniform
    proba = vote(np.array([[0.5, 0.9], [0.3, 0.2]]), np.array([[2, -1], [-1, -1]]), 3, 0.1)
    np.testing.assert_allclose(proba, [[0, 0, 1], [1 / 3, 1 / 3, 1 / 3]])
    with pytest.raises(DataError, match="temperature"):
        vote(np.zeros((1, 1)), np.zeros((1, 1), int), 2, temperature=0)


def test_vote_multi_arithmetic_by_hand():
    sims = np.array([[1.0, 0.0], [0.5, 0.5]])
    labels = np.array([[[1, 1, 0], [0, 1, 1]], [[1, 0, 0], [0, 0, 0]]])
    w = math.exp(10) / (math.exp(10) + 1)  # softmax([1.0, 0.0] / 0.1)
    valid = np.array([[True, True], [False, False]])
    proba = vote_multi(sims, labels, temperature=0.1, valid=valid, prior=np.array([0.2, 0.3, 0.4]))
    np.testing.assert_allclose(proba, [[w, 1.0, 1 - w], [0.2, 0.3, 0.4]])


def test_knn_excludes_the_query_itself(data):
    (X, y), _ = data
    knn = KNNHead(k=5).fit(X, y)
    _, ids = knn.kneighbors(X[:50])
    assert (ids[:, 0] == np.arange(50)).all()  # without exclusion each query finds itself
    sims, ids = knn.kneighbors(X[:50], exclude=np.arange(50))
    assert ids.shape == (50, 5) and (ids != np.arange(50)[:, None]).all() and (ids >= 0).all()
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    # a label carried by one vector only: its own vote disappears once it is excluded
    lonely = np.array(list(y[:-1]) + ["reggae"], dtype=object)
    knn = KNNHead(k=3).fit(X, lonely)
    col = knn.classes_.tolist().index("reggae")
    assert knn.predict_proba(X[-1:])[0, col] > 0.3
    assert knn.predict_proba(X[-1:], exclude=np.array([len(X) - 1]))[0, col] == 0.0
    assert knn.predict_proba(X[-1:], exclude=np.array([-1]))[0, col] > 0.3


def test_knn_with_fewer_vectors_than_k():
    X, y = blobs(6, seed=3)
    proba = KNNHead(k=50).fit(X, y).predict_proba(X, exclude=np.arange(6))
    np.testing.assert_allclose(proba.sum(1), 1.0)


def test_ensemble_blends_its_fitted_heads(data):
    (X, y), (X_test, _) = data
    head = EnsembleHead(LinearHead(), KNNHead(), weights=[0.0, 0.3, 1.0]).fit(X, y)
    assert head.val_losses_[[0.0, 0.3, 1.0].index(head.weight_)] == head.val_losses_.min()
    # the weight is the parametric head's share: 1.0 answers like the linear head, 0.0 like kNN
    only_head = EnsembleHead(LinearHead(), KNNHead(), weights=[1.0]).fit(X, y)
    only_knn = EnsembleHead(LinearHead(), KNNHead(), weights=[0.0]).fit(X, y)
    np.testing.assert_allclose(only_head.predict_proba(X_test), LinearHead().fit(X, y).predict_proba(X_test))
    np.testing.assert_allclose(only_knn.predict_proba(X_test), KNNHead().fit(X, y).predict_proba(X_test))
    assert not np.allclose(only_head.predict_proba(X_test), only_knn.predict_proba(X_test))
    with pytest.raises(DataError, match="multi_label"):
        EnsembleHead(LinearHead(), KNNHead(multi_label=True)).fit(X, y)


def test_hierarchical_head_levels_are_consistent():
    taxonomy = Taxonomy.default()
    fine = np.array(["thrash metal", "death metal", "bebop", "deep house"], dtype=object)
    X, y = blobs(300, seed=0)
    labels = fine[np.searchsorted(CLASSES, y)]
    head = HierarchicalHead(LinearHead(), taxonomy).fit(X, labels)
    X_test, y_test = blobs(100, seed=1)
    levels = head.predict_levels(X_test)
    assert list(levels) == ["top", "level1", "fine"]
    top, top_classes = levels["top"]
    assert top_classes == ["electronic", "jazz", "metal"]
    fine_p, fine_classes = levels["fine"]
    np.testing.assert_allclose(top.sum(1), 1.0)
    metal = [fine_classes.index("thrash metal"), fine_classes.index("death metal")]
    np.testing.assert_allclose(top[:, 2], fine_p[:, metal].sum(1))
    mid, mid_classes = levels["level1"]
    np.testing.assert_allclose(mid[:, mid_classes.index("house")],
                               fine_p[:, fine_classes.index("deep house")])
    top_truth = np.array([taxonomy.path(g)[0] for g in fine[np.searchsorted(CLASSES, y_test)]])
    assert np.mean(np.array(top_classes)[top.argmax(1)] == top_truth) > 0.85
    paths = head.predict_paths(X_test[:2], top=2)
    assert len(paths[0]) == 2 and paths[0][0][1] >= paths[0][1][1]
    assert paths[0][0][0][-1] in fine and paths[0][0][0][0] in taxonomy.roots
    with pytest.raises(DataError, match="not in the taxonomy.*polka"):
        HierarchicalHead(LinearHead(), taxonomy).fit(X, np.where(y == "jazz", "polka", y))
    with pytest.raises(DataError, match="single-label"):
        HierarchicalHead(LinearHead(multi_label=True), taxonomy).fit(X, labels)


@pytest.mark.parametrize("name", ["linear", "mlp", "knn", "ensemble"])
def test_save_load_round_trip(name, data, tmp_path):
    (X, y), (X_test, _) = data
    head = FACTORIES[name](False).fit(X, y)
    path = save_head(head, tmp_path / "heads" / "genre.npz", feature_id="gram-abc", pickle=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["genre.joblib", "genre.json", "genre.npz"]
    info = read_head_info(path)
    assert info["head"] == type(head).__name__ and info["classes"] == CLASSES.tolist()
    assert info["feature_id"] == "gram-abc"
    loaded = load_head(path, expect_feature_id="gram-abc")
    np.testing.assert_array_equal(loaded.predict_proba(X_test), head.predict_proba(X_test))
    with pytest.raises(IndexMismatchError, match="gram-abc"):
        load_head(path, expect_feature_id="clip-xyz")
    with pytest.raises(IndexMismatchError, match="gram-abc"):
        load_predictor(path, expect_feature_id="clip-xyz")


def test_linear_head_compiles_to_the_arithmetic_of_its_scikit_learn_pipeline(data):
    """Compiled probabilities against scikit-learn's own predict_proba: multinomial, binary
    (one coefficient row, a sigmoid) and one-vs-rest multi-label."""
    (X, y), (X_test, _) = data
    Xm, ym = multi_blobs(300, 5)
    two = np.where(np.isin(y, ["country", "jazz"]), "calm", "loud")
    for head, X_fit, y_fit in ((LinearHead(), X, y), (LinearHead(), X, two),
                               (LinearHead(multi_label=True), Xm, ym), (LinearHead(scale=False), X, y)):
        head.fit(X_fit, y_fit)
        expected = head.model_.predict_proba(X_test)
        np.testing.assert_allclose(head.compile().predict_proba(X_test), expected, atol=1e-6)


@pytest.mark.parametrize("multi", [False, True])
def test_saved_heads_predict_alike_without_scikit_learn_or_torch(multi, data, tmp_path):
    (X, y), (X_test, _) = data
    if multi:
        X, y = multi_blobs(300, 3)
    exclude = np.full(len(X_test), -1)
    exclude[:5] = [0, 1, 2, 3, 4]  # a query that is a fitted row leaves its own vote out
    expected = {}
    for name, factory in FACTORIES.items():
        head = factory(multi).fit(X, y)
        save_head(head, tmp_path / f"{name}.npz", feature_id="f")
        expected[name] = head.predict_proba(X_test, exclude=exclude)
    np.save(tmp_path / "x.npy", X_test)
    np.save(tmp_path / "exclude.npy", exclude)
    code = f"""
import sys, numpy as np
from pathlib import Path
from stylegen.heads import load_predictor
root = Path({str(tmp_path)!r})
x, exclude = np.load(root / "x.npy"), np.load(root / "exclude.npy")
for name in {list(FACTORIES)!r}:
    np.save(root / f"{{name}}.p.npy", load_predictor(root / f"{{name}}.npz", expect_feature_id="f")
            .predict_proba(x, exclude=exclude))
print(sorted(m for m in ("sklearn", "torch", "scipy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for name, want in expected.items():
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.p.npy"), want, atol=1e-6, err_msg=name)


def test_a_head_without_a_compiled_form_is_refused_not_pickled(data, tmp_path):
    """A query can only load plain arrays, so a head it could not load is not saved at all."""
    from sklearn.linear_model import LogisticRegression

    (X, y), _ = data
    head = EnsembleHead(LogisticRegression(max_iter=500), KNNHead(k=5)).fit(X, y)
    with pytest.raises(DataError, match="no compiled form"):
        save_head(head, tmp_path / "ens.npz", feature_id="f")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path, data):
    with pytest.raises(ModelNotFoundError):
        load_head(tmp_path / "absent.npz")
    with pytest.raises(DataError, match="unfitted"):
        save_head(LinearHead(), tmp_path / "h.npz")
    (X, y), _ = data
    path = save_head(KNNHead().fit(X, y), tmp_path / "h.npz", feature_id="f", pickle=True)
    path.with_suffix(".joblib").write_bytes(b"truncated")
    with pytest.raises(DataError, match="cannot read head"):
        load_head(path)
    path.write_bytes(b"truncated")
    with pytest.raises(DataError, match="cannot read compiled head"):
        load_predictor(path)


def artist_blobs(n_artists: int, per_artist: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Covers of one artist are near-copies of an artist vector: a weak class direction plus a
    strong direction of the artist's own, as with real album covers."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n_artists)
    artist = 0.6 * MEANS[labels] + rng.normal(scale=0.35, size=(n_artists, 32))
    rows = np.repeat(np.arange(n_artists), per_artist)
    X = artist[rows] + rng.normal(scale=0.02, size=(len(rows), 32))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), CLASSES[labels[rows]], rows.astype(str)


def test_grouped_split_keeps_groups_apart_and_falls_back_for_singletons():
    from stylegen.sources.labels import grouped_split, stratified_split

    _, y, groups = artist_blobs(40, 5, seed=3)
    train, val = grouped_split(y, 0.2, 0, groups)
    assert len(val) and not set(groups[train]) & set(groups[val])
    assert set(y[val]) == set(y)  # stratified as well
    singletons = np.arange(len(y)).astype(str)
    for a, b in zip(grouped_split(y, 0.2, 0, singletons), stratified_split(y, 0.2, 0), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ensemble_weight_with_artist_groups_trusts_knn_less():
    X, y, groups = artist_blobs(60, 6, seed=4)
    def make():
        return EnsembleHead(LinearHead(), KNNHead(k=5), weights=np.linspace(0, 1, 11))
    plain = make().fit(X, y)
    grouped = make().fit(X, y, groups=groups)
    assert plain.weight_ <= 0.2  # an artist's other covers vote: kNN looks near perfect
    assert grouped.weight_ > plain.weight_


def test_multi_label_linear_head_gives_a_rare_label_its_base_rate_instead_of_failing():
    """A label on one cover of a CV fold (the Discogs long tail) used to raise "fewer than 2
    examples" after minutes of fitting; it now gets its smoothed base rate, a constant, while the
    other labels are fitted as before (same probabilities as a head fitted without it)."""
    X, y = multi_blobs(300, 4)
    rare = [list(labels) + (["rock---zeuhl"] if i == 0 else []) for i, labels in enumerate(y)]
    rare = [labels + ["everything"] for labels in rare]  # on every row: no negative
    head = LinearHead(multi_label=True).fit(X, rare)
    alone = LinearHead(multi_label=True).fit(X, y)
    proba = head.predict_proba(X[:20])
    cls = list(head.classes_)
    np.testing.assert_allclose(proba[:, cls.index("rock---zeuhl")], 1.5 / 301, rtol=1e-5)
    np.testing.assert_allclose(proba[:, cls.index("everything")], 300.5 / 301, rtol=1e-5)
    shared = [cls.index(c) for c in alone.classes_]
    np.testing.assert_allclose(proba[:, shared], alone.predict_proba(X[:20]), atol=1e-6)
    assert np.isnan(head.C_[cls.index("rock---zeuhl")]) and not np.isnan(head.C_[shared]).any()


def test_one_C_is_used_as_given_without_a_search(data):
    """Cs with one value: a plain regression at that C (the multi-label default, where a
    per-label search costs 19 fits per label), the same as scikit-learn's at that C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (X, y), (X_test, _) = data
    head = LinearHead(Cs=(0.01,)).fit(X, y)
    assert head.C_ == 0.01
    Z = StandardScaler().fit(X)
    ref = LogisticRegression(C=0.01, class_weight="balanced", max_iter=2000).fit(Z.transform(X), y)
    np.testing.assert_allclose(head.predict_proba(X_test), ref.predict_proba(Z.transform(X_test)), atol=1e-5)
    Xm, ym = multi_blobs(200, 6)
    assert np.all(LinearHead(multi_label=True, Cs=(0.001,)).fit(Xm, ym).C_ == 0.001)
