"""The registries of the torch components (models, optimizers, augmentations), importable without
torch. Each name is declared with the module that registers it (Registry.lazy), so a config's
names are checked in a process that never imports torch; `get` imports the module on first use."""
from __future__ import annotations

from .errors import ConfigError
from .registry import Registry

MODELS: Registry = Registry("model", "poisongrid.models")
OPTIMIZERS: Registry = Registry("optimizer")
AUGMENTS: Registry = Registry("augment")

# A name registered in models.py or training.py must be listed here too (tests/test_light_stages.py checks).
for _name in ("resnet18", "resnet34", "resnet50", "smallcnn", "resnet_s", "resnet_s1", "resnet_s2", "vgg_s", "lenet_s",
              "mobilenetv2_s", "densenet121", "squeezenet1_0", "vgg16_bn"):
    MODELS.lazy(_name, "poisongrid.models")
for _name in ("adamw", "adam", "radam", "sgd"):
    OPTIMIZERS.lazy(_name, "poisongrid.training")
for _name in ("none", "crop_flip", "crop_flip_zero", "resized_crop_flip"):
    AUGMENTS.lazy(_name, "poisongrid.training")
# Learning-rate schedules (training.lr_schedule).
SCHEDULES = ("cosine", "constant", "multistep")


def check_schedule(training: dict, key: str) -> None:
    """The schedule keys of one training run (its own keys over the dataset's) fit together."""
    kind = training.get("schedule", "cosine")
    if kind == "multistep":
        ms = training.get("milestones") or []
        if not ms or list(ms) != sorted(set(ms)):
            raise ConfigError(f"{key}.milestones", training.get("milestones"), "increasing epochs, at least one, "
                              "for schedule: multistep")
    else:
        for k in ("milestones", "gamma"):
            if k in training:
                raise ConfigError(f"{key}.{k}", training[k], f"nothing unless schedule: multistep (schedule is {kind})")
    if training.get("nesterov") and (training.get("optimizer") != "sgd" or not training.get("momentum", 0.9) > 0):
        raise ConfigError(f"{key}.nesterov", True, "true only with optimizer: sgd and a momentum > 0")
