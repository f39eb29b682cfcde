"""Sample-level Mixup / CutMix (mmkd.data.mixing) against timm's ``Mixup`` in ``mode="elem"``:
timm itself is the reference. Its ``_mix_elem`` (timm/data/mixup.py) mixes sample ``i`` of a batch
with sample ``B - 1 - i``: ``x[i] * lam + x[j] * (1 - lam)``, or for CutMix pastes the box of
``cutmix_bbox_and_lam`` (centre ``np.random.randint(0, H)``, then ``randint(0, W)``) and takes
the ratio from the clipped box's area; ``mixup_target`` mixes smoothed one-hot targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import Mixup

from mmkd.data.mixing import SampleMixup

NUM_CLASSES = 10


def timm_elem(lam: float, cutmix: bool, images: torch.Tensor, labels: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's elem-mode Mixup of a 2-sample batch, sample 0 drawn with ``lam`` (sample 1 left as it is)."""
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", num_classes=NUM_CLASSES, **kwargs)
    mixup._params_per_elem = lambda batch_size: (np.array([lam, 1.0], dtype=np.float32), np.array([cutmix, False]))
    return mixup(images.clone(), labels)


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 24, 20, generator=generator), torch.tensor([3, 7])


def test_sample_mixup_is_timms_elem_mixup(pair) -> None:
    images, labels = pair
    expected_images, expected_targets = timm_elem(0.375, False, images, labels, label_smoothing=0.1)
    mixing = SampleMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    mixed, ratio = mixing.mix({"image": images[0]}, {"image": images[1]}, np.array([0.375, 0, 0.5, 0.5], dtype=np.float32))
    assert ratio == 0.375
    torch.testing.assert_close(mixed["image"], expected_images[0], rtol=0, atol=0)
    torch.testing.assert_close(mixing.target(3, 7, ratio, NUM_CLASSES), expected_targets[0], rtol=0, atol=1e-7)


@pytest.mark.parametrize("lam, seed", [(0.6, 0), (0.3, 5), (0.05, 11)])  # the last: a box larger than the image, clipped
def test_sample_cutmix_is_timms_elem_cutmix(pair, lam: float, seed: int) -> None:
    images, labels = pair
    height, width = images.shape[-2:]
    np.random.seed(seed)
    centre_y, centre_x = np.random.randint(0, height), np.random.randint(0, width)  # what timm's rand_bbox will draw
    np.random.seed(seed)
    expected_images, expected_targets = timm_elem(lam, True, images, labels, label_smoothing=0.1)
    mixing = SampleMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    params = np.array([lam, 1, (centre_y + 0.5) / height, (centre_x + 0.5) / width], dtype=np.float32)
    mixed, ratio = mixing.mix({"image": images[0]}, {"image": images[1]}, params)
    torch.testing.assert_close(mixed["image"], expected_images[0], rtol=0, atol=0)
    torch.testing.assert_close(mixing.target(3, 7, ratio, NUM_CLASSES), expected_targets[0], rtol=0, atol=1e-6)
    assert ratio != pytest.approx(float(np.float32(lam)))  # corrected by the clipped area (correct_lam)


def test_every_view_of_a_sample_is_cut_at_the_same_place() -> None:
    mixing = SampleMixup(mixup_alpha=0.0, cutmix_alpha=1.0)
    own = {"image": torch.zeros(1, 28, 28), "teacher_image": torch.zeros(3, 56, 56)}
    partner = {"image": torch.ones(1, 28, 28), "teacher_image": torch.ones(3, 56, 56)}
    mixed, ratio = mixing.mix(own, partner, np.array([0.75, 1, 0.25, 0.5], dtype=np.float32))
    # sqrt(1 - 0.75) = 1/2 of each side: 14 x 14 centred at (7, 14) in the student's view, 28 x 28 at (14, 28) in the teacher's
    assert ratio == 1 - 14 * 14 / 28**2 == 0.75
    assert mixed["image"].sum() == 14 * 14 and mixed["image"][0, 0:14, 7:21].all()
    assert mixed["teacher_image"].sum() == 3 * 28 * 28 and mixed["teacher_image"][:, 0:28, 14:42].all()


def test_draws_depend_on_seed_epoch_and_index_only_and_follow_the_recipe() -> None:
    mixing = SampleMixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.5)
    draws = [mixing.draw(0, 3, index, 500) for index in range(4000)]
    partners = np.array([partner for partner, _ in draws])
    params = np.stack([params for _, params in draws])
    assert all(mixing.draw(0, 3, index, 500)[0] == partners[index] for index in (0, 17, 3999))
    np.testing.assert_array_equal(mixing.draw(0, 3, 17, 500)[1], params[17])
    assert not np.array_equal(mixing.draw(0, 4, 17, 500)[1], params[17]) and not np.array_equal(mixing.draw(1, 3, 17, 500)[1], params[17])
    assert partners.min() >= 0 and partners.max() < 500 and not np.any(partners == np.arange(4000))  # never itself
    assert params.dtype == np.float32 and params.shape == (4000, 4)
    mixed = params[:, 0] < 1
    assert abs(mixed.mean() - 0.6) < 0.03  # prob
    assert abs(params[mixed, 1].mean() - 0.5) < 0.04  # switch_prob: CutMix or mixup
    assert abs(params[mixed, 0].mean() - 0.5) < 0.02  # Beta(a, a) has mean 1/2
    assert mixing.draw(0, 0, 0, 1)[0] == 0  # a one-sample split mixes with itself
    with pytest.raises(ValueError, match="one of them > 0"):
        SampleMixup(mixup_alpha=0.0, cutmix_alpha=0.0)


def test_a_data_module_mixes_only_augmented_training_samples_and_never_under_semi_supervision() -> None:
    from mmkd.data import ImageFilesDataModule, SemiSupervisedDataModule

    mixup = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}
    with pytest.raises(ValueError, match="needs augment=true"):
        ImageFilesDataModule(root="photos", mixup=mixup, augment=False)
    with pytest.raises(ValueError, match="cannot wrap a data module that mixes samples"):
        SemiSupervisedDataModule(ImageFilesDataModule(root="photos", mixup=mixup))
