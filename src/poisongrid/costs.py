"""Relative training cost of the registered models, for time estimates made without torch.

minutes_per_epoch is measured per dataset with the dataset's own model; a defender or final model of
another architecture scales it by the ratio of forward multiply-accumulates per image (GMACs,
torch.utils.flop_counter, one 3-channel image, 10 classes), tabulated for each stem: images up to
SMALL_IMAGE px get the CIFAR-style stems (columns at 32 px), larger ones the ImageNet stems (224 px).
tests/test_models.py recomputes the table."""
from __future__ import annotations

# Images at or below this size get the CIFAR-style stem (3x3 stride-1 first conv).
SMALL_IMAGE = 64

# model -> (GMACs at 32 px, GMACs at 224 px)
GMACS = {
    "resnet18": (0.1402, 1.8136), "resnet34": (0.2912, 3.6633), "resnet50": (0.3258, 4.0872),
    "densenet121": (0.8884, 2.8331), "vgg16_bn": (0.3321, 15.4662), "squeezenet1_0": (0.0525, 0.7324),
    "smallcnn": (0.0028, 0.1373), "resnet_s": (0.0001, 0.0040), "resnet_s1": (0.0000, 0.0019),
    "resnet_s2": (0.0647, 0.8887), "vgg_s": (0.0013, 0.0614), "lenet_s": (0.0001, 0.0042),
    "mobilenetv2_s": (0.0003, 0.0041),
}


def cost_factor(model: str, reference: str, image_size: int | None) -> float:
    """How much longer an epoch of `model` takes than one of `reference` (>= 1). A cheaper model
    keeps the reference's measured time: small models are bound by data movement, not arithmetic,
    and a scheduler's time limit must not fall short. Models missing from the table count as 1."""
    if model == reference or model not in GMACS or reference not in GMACS:
        return 1.0
    col = 0 if (image_size or 32) <= SMALL_IMAGE else 1
    return max(1.0, GMACS[model][col] / GMACS[reference][col])


# A dataset without a measured minutes_per_epoch gets one derived from its size, image size and
# model, at rates measured on one H200 with graph-replayed bf16 steps (README, Benchmarks): the
# arithmetic of ResNet-50 at 32 px, batch 128 (25,900 images/s x 0.326 forward GMACs, the lowest
# of the measured rates: an estimate that errs long, as a scheduler's time limit must), and no
# more images per second than the fastest measured step (ResNet-18, batch 512, 125,000 images/s),
# which bounds small models by data movement and kernel launches.
MEASURED_FWD_GMACS_PER_S = 25_900 * 0.3258
MAX_IMAGES_PER_S = 125_000
# Eager steps (detectors' own loops, CBD, triggers) at 32 px ran 4.6x slower than replayed ones
# (5,600 vs 25,900 images/s, ResNet-50); at 224 px arithmetic dominates (4,100 vs 4,300).
EAGER_SLOWDOWN = {"small": 4.6, "large": 1.05}


def gmacs(model: str, image_size: int | None) -> float | None:
    """Forward GMACs per image of `model` at `image_size` (the table's column for its stem, scaled
    by pixel count); None for a model missing from the table."""
    if model not in GMACS:
        return None
    size = image_size or 32
    small = size <= SMALL_IMAGE
    base = GMACS[model][0 if small else 1]
    return base * (size / (32 if small else 224)) ** 2


def derived_minutes_per_epoch(n_train: int, model: str, image_size: int | None, eager: bool = False) -> float:
    """Minutes of one training epoch of `n_train` images on one GPU, from the measured rates above
    (models missing from the table count as ResNet-50)."""
    g = gmacs(model, image_size) or gmacs("resnet50", image_size)
    rate = min(MAX_IMAGES_PER_S, MEASURED_FWD_GMACS_PER_S / max(g, 1e-12))
    if eager:
        rate /= EAGER_SLOWDOWN["small" if (image_size or 32) <= SMALL_IMAGE else "large"]
    return n_train / rate / 60.0
