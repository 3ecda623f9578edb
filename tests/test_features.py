import numpy as np
import pytest
import torch

from stylegen.featurize.features import (
    channel_projection,
    gram_upper,
    l2_normalize,
    signed_sqrt,
    style_vector,
)


def test_gram_upper_matches_hand_computed_example():
    # one image, 2 channels, 2x1 spatial: F = [[1, 2], [3, -1]]
    acts = torch.tensor([[[[1.0], [2.0]], [[3.0], [-1.0]]]])  # (B=1, C=2, H=2, W=1)
    g = gram_upper(acts)
    # G = F F^T / (H*W) = [[1+4, 3-2], [3-2, 9+1]] / 2 -> upper triangle [2.5, 0.5, 5.0]
    assert torch.allclose(g, torch.tensor([[2.5, 0.5, 5.0]]))


def test_signed_sqrt_and_l2_normalize():
    x = torch.tensor([[4.0, -9.0, 0.0]])
    s = signed_sqrt(x)
    assert torch.allclose(s, torch.tensor([[2.0, -3.0, 0.0]]))
    n = l2_normalize(s)
    assert torch.allclose(n, torch.tensor([[2.0, -3.0, 0.0]]) / np.sqrt(13))


def test_style_vector_concatenates_layers_with_unit_norm():
    acts = {"a": torch.randn(3, 4, 5, 5), "b": torch.randn(3, 6, 2, 2)}
    v = style_vector(acts)
    assert v.shape == (3, 4 * 5 // 2 + 6 * 7 // 2)
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)
    # each layer contributes exactly half of the squared norm
    assert torch.allclose(v[:, :10].norm(dim=1) ** 2, torch.full((3,), 0.5), atol=1e-5)


def test_wide_layers_are_projected_to_max_channels():
    acts = {"wide": torch.randn(2, 300, 4, 4)}
    assert style_vector(acts, max_channels=16).shape == (2, 16 * 17 // 2)
    p = channel_projection(300, 16)
    assert torch.allclose(p @ p.T, torch.eye(16), atol=1e-5)  # orthonormal rows
    assert torch.equal(p, channel_projection(300, 16))  # reproducible


@pytest.mark.parametrize("precision", ["bf16"])
def test_reduced_precision_features_stay_close_to_fp32(precision):
    from stylegen.config import BackboneConfig, FeatureConfig
    from stylegen.featurize import backbones
    from stylegen.featurize.features import Featurizer

    bb = backbones.build(BackboneConfig())
    pixels = np.random.default_rng(0).integers(0, 255, (4, 224, 224, 3), dtype=np.uint8)
    ref = Featurizer(bb, FeatureConfig(), torch.device("cpu"), "fp32", False)(pixels)
    low = Featurizer(bb, FeatureConfig(), torch.device("cpu"), precision, True)(pixels)
    for part in ref:
        cos = (ref[part] * low[part]).sum(1) / np.linalg.norm(ref[part], axis=1) / np.linalg.norm(low[part], axis=1)
        assert cos.min() > 0.98, (part, cos)
