import numpy as np
import pytest

from stylegen.config import CompressionConfig
from stylegen.index.compress import Compressor, combine


@pytest.mark.parametrize("method", ["pca", "rp", "none"])
def test_compressor_round_trip_shapes(tmp_path, rng, method):
    raw = {"style": rng.normal(size=(50, 40)).astype(np.float32),
           "content": rng.normal(size=(50, 12)).astype(np.float32)}
    comp = Compressor.fit(raw, CompressionConfig(method=method, dims={"style": 8, "content": 8}))
    out = comp.transform(raw)
    expected = {"pca": (8, 8), "rp": (8, 8), "none": (40, 12)}[method]
    assert (out["style"].shape[1], out["content"].shape[1]) == expected
    comp.save(tmp_path / "c.npz")
    again = Compressor.load(tmp_path / "c.npz").transform(raw)
    for part in raw:
        np.testing.assert_allclose(out[part], again[part], rtol=1e-6)


def test_pca_dims_are_capped_by_collection_size(rng):
    raw = {"style": rng.normal(size=(5, 40)).astype(np.float32)}
    comp = Compressor.fit(raw, CompressionConfig(dims={"style": 256}))
    assert comp.dims["style"] == 4


def test_whitened_pca_has_unit_variance(rng):
    x = rng.normal(size=(400, 20)) * np.arange(1, 21)
    comp = Compressor.fit({"style": x}, CompressionConfig(dims={"style": 5}, whiten=True))
    y = comp.transform({"style": x})["style"]
    np.testing.assert_allclose(y.std(axis=0, ddof=1), np.ones(5), rtol=1e-3)


def test_combine_weights_parts_and_normalises():
    parts = {"style": np.array([[3.0, 4.0]]), "content": np.array([[1.0, 0.0, 0.0]])}
    v, slices = combine(parts, {"style": 1.0, "content": 1.0})
    assert slices == {"style": (0, 2), "content": (2, 5)}
    np.testing.assert_allclose(v, [[0.6, 0.8, 1.0, 0.0, 0.0]] / np.sqrt(2), rtol=1e-6)
    v2, _ = combine(parts, {"style": 1.0, "content": 0.0})
    np.testing.assert_allclose(v2[0, 2:], 0.0)



@pytest.mark.parametrize("dim", [8, 150])  # randomized and full SVD
def test_fitting_in_place_gives_the_same_projection_and_only_when_asked(rng, dim):
    x = rng.normal(size=(300, 160)).astype(np.float32) + 5.0  # a mean to centre away
    kept = x.copy()
    config = CompressionConfig(dims={"style": dim})
    copied = Compressor.fit({"style": x}, config).parts["style"]
    np.testing.assert_array_equal(x, kept)  # the default never touches the caller's data
    in_place = Compressor.fit({"style": x}, config, overwrite=True).parts["style"]
    np.testing.assert_array_equal(in_place.components, copied.components)
    np.testing.assert_array_equal(in_place.mean, copied.mean)


def test_fitting_in_place_does_not_hold_the_sample_twice(rng):
    """A build's PCA sample can be 100,000 x 17,824 floats: no second copy of it."""
    import tracemalloc

    config = CompressionConfig(dims={"style": 8})
    peaks = {}
    for overwrite in (False, True):
        x = rng.normal(size=(4000, 500)).astype(np.float32)  # 8 MB
        tracemalloc.start()
        Compressor.fit({"style": x}, config, overwrite=overwrite)
        peaks[overwrite] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[False] > x.nbytes and peaks[True] < 0.5 * x.nbytes, peaks
