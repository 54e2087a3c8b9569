"""Model registry. Every model takes float images in [0, 1] (N, C, H, W) and returns logits;
normalisation lives inside the model so data can stay uint8 until the model's input."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .costs import SMALL_IMAGE  # the stem threshold (costs.py tabulates each side of it)
from .zoo import MODELS


class Normalize(nn.Module):
    def __init__(self, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _torchvision_models():
    # Imported when a torchvision architecture is built: about a second of every job's start otherwise.
    import torchvision.models

    return torchvision.models


def _resnet(name: str):
    def build(num_classes: int, image_size: int) -> nn.Module:
        net = getattr(_torchvision_models(), name)(num_classes=num_classes)
        if image_size <= SMALL_IMAGE:
            # CIFAR stem as in the BaDLoss reference code: 3x3 stride-1 conv; the max-pool is kept.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        return nn.Sequential(Normalize(), net)

    return build


for _name in ("resnet18", "resnet34", "resnet50"):
    MODELS.register(_name)(_resnet(_name))


# --- Table 5's other architectures (the BaDLoss code builds these three from torchvision, like the ResNets).


@MODELS.register("densenet121")
def densenet121(num_classes: int, image_size: int) -> nn.Module:
    net = _torchvision_models().densenet121(weights=None, num_classes=num_classes)
    if image_size <= SMALL_IMAGE:
        # CIFAR DenseNet stem: 3x3 stride-1 conv, no max-pool (32 px reaches the last block at 4x4).
        net.features.conv0 = nn.Conv2d(3, net.features.conv0.out_channels, kernel_size=3, stride=1, padding=1,
                                       bias=False)
        net.features.pool0 = nn.Identity()
    return nn.Sequential(Normalize(), net)


@MODELS.register("vgg16_bn")
def vgg16_bn(num_classes: int, image_size: int) -> nn.Module:
    """VGG-16 with batch norm, as the BaDLoss code uses it."""
    net = _torchvision_models().vgg16_bn(weights=None, num_classes=num_classes)
    if image_size <= SMALL_IMAGE:
        # Five pools leave 32 px at 1x1 (64 px at 2x2): pool that to one vector instead of
        # upsampling it to the 7x7 grid the 224-px classifier reads (25088 inputs, 49 copies of each).
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        channels = [m for m in net.features if isinstance(m, nn.Conv2d)][-1].out_channels
        net.classifier[0] = nn.Linear(channels, net.classifier[0].out_features)
    return nn.Sequential(Normalize(), net)


@MODELS.register("squeezenet1_0")
def squeezenet1_0(num_classes: int, image_size: int) -> nn.Module:
    """SqueezeNet 1.0 (the version the BaDLoss code uses). Its classifier, a 1x1 conv to the classes
    averaged over positions, is written as pooling then a Linear (the same map, as both are linear)
    so the penultimate feature is a vector like every other model's; the ReLU torchvision applies to
    the logits is left out."""
    net = _torchvision_models().squeezenet1_0(weights=None, num_classes=num_classes)
    if image_size <= SMALL_IMAGE:
        # Same CIFAR stem as _resnet: 3x3 stride-1 conv, max-pool kept, so 32 px ends at 4x4, not 1x1.
        net.features[0] = nn.Conv2d(3, net.features[0].out_channels, kernel_size=3, stride=1, padding=1)
    head = nn.Linear(net.classifier[1].in_channels, num_classes)
    nn.init.normal_(head.weight, 0.0, 0.01)  # torchvision's init of the 1x1 conv it replaces
    nn.init.zeros_(head.bias)
    net.classifier = nn.Sequential(nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    return nn.Sequential(Normalize(), net)


@MODELS.register("smallcnn")
def smallcnn(num_classes: int, image_size: int) -> nn.Module:
    """A fast CPU model for the demo: three conv blocks and global pooling (about 25 k parameters)."""

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return nn.Sequential(
        Normalize(),
        block(3, 16), nn.MaxPool2d(2),
        block(16, 32), nn.MaxPool2d(2),
        block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, num_classes),
    )


# --- Low-capacity teachers (LfD, section 5.3). "Neurons" in the paper are read as channels.


def _conv_bn(cin, cout, kernel, stride=1, groups=1, act: type[nn.Module] | None = nn.ReLU):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, act=None)
        # Projection as in torchvision: whenever the shape changes (stride or width).
        self.shortcut = (
            _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet with one BasicBlock per stage; the stem has the first stage's width."""

    def __init__(self, widths, num_classes: int, image_size: int):
        super().__init__()
        if image_size <= SMALL_IMAGE:
            # Same CIFAR stem as _resnet: 3x3 stride-1 conv, max-pool kept.
            self.stem = nn.Sequential(_conv_bn(3, widths[0], 3), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(_conv_bn(3, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], widths[0]
        for width, stride in zip(widths, (1, 2, 2, 2)):
            stages.append(BasicBlock(cin, width, stride))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))))


def _small_resnet(widths):
    def build(num_classes: int, image_size: int) -> nn.Module:
        return nn.Sequential(Normalize(), SmallResNet(widths, num_classes, image_size))

    return build


MODELS.register("resnet_s")(_small_resnet((2, 2, 2, 4)))
MODELS.register("resnet_s1")(_small_resnet((1, 1, 1, 1)))
MODELS.register("resnet_s2")(_small_resnet((64, 128, 256, 512)))

# VGG-11 layout ("M" = 2x2 max-pool) with the paper's VGG-S conv widths.
VGG_S = (4, "M", 8, "M", 16, 16, "M", 32, 32, "M", 32, 512, "M")


@MODELS.register("vgg_s")
def vgg_s(num_classes: int, image_size: int) -> nn.Module:
    layers, cin, size = [], 3, image_size
    for item in VGG_S:
        if item == "M":
            # A pool is dropped once the map is down to 1 px, so small images still build;
            # at 32 px all five pools are kept, as in CIFAR VGG-11.
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            layers.append(_conv_bn(cin, item, 3))
            cin = item
    return nn.Sequential(
        Normalize(), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
    )


@MODELS.register("lenet_s")
def lenet_s(num_classes: int, image_size: int) -> nn.Module:
    """LeNet-5 with 1 and 2 conv channels and a 20-unit hidden layer."""
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(3, 1, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(1, 2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        # 5x5 is LeNet's map at 32 px (identity there); other sizes are resampled to it.
        nn.AdaptiveAvgPool2d(5), nn.Flatten(),
        nn.Linear(2 * 5 * 5, 20), nn.ReLU(inplace=True),
        nn.Linear(20, num_classes),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 projection."""

    def __init__(self, cin: int, expand: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(cin, expand, 1, act=nn.ReLU6),
            _conv_bn(expand, expand, 3, stride, groups=expand, act=nn.ReLU6),
            _conv_bn(expand, cout, 1, act=None),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.body(x)
        return x + out if self.residual else out


@MODELS.register("mobilenetv2_s")
def mobilenetv2_s(num_classes: int, image_size: int) -> nn.Module:
    # Strides as MobileNetV2 (stage 1: 1, stage 2: 2); only the stem follows the CIFAR rule.
    stem_stride = 1 if image_size <= SMALL_IMAGE else 2
    return nn.Sequential(
        Normalize(),
        _conv_bn(3, 4, 3, stem_stride, act=nn.ReLU6),
        InvertedResidual(4, 4, 8, 1),
        InvertedResidual(8, 4, 8, 2),
        InvertedResidual(8, 8, 8, 1),
        _conv_bn(8, 16, 1, act=nn.ReLU6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    return MODELS.get(name, "model")(num_classes, image_size)


@functools.lru_cache(maxsize=None)
def parameter_count(name: str, num_classes: int = 10, image_size: int = 32) -> int:
    """Number of parameters (trainable or not, buffers excluded) of a registered model."""
    return sum(p.numel() for p in build_model(name, num_classes, image_size).parameters())


def penultimate_module(model: nn.Module) -> nn.Module:
    """The last nn.Linear of `model`; its input is the penultimate-layer feature."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    return linears[-1]


def _run_order(model: nn.Module, kind: type, image_size: int) -> list[tuple[str, nn.Module]]:
    """(name, module) of every `kind` module in the order one forward pass runs them."""
    names = {id(m): n for n, m in model.named_modules()}
    seen: list[tuple[str, nn.Module]] = []
    _traced_forward(model, [m for m in model.modules() if isinstance(m, kind)],
                    lambda mod, i, o: seen.append((names[id(mod)], mod)), image_size)
    return seen


def _traced_forward(model: nn.Module, modules: list[nn.Module], hook, image_size: int) -> None:
    """One eval-mode forward pass of a blank image with `hook` on each of `modules`; the model's
    mode and hooks are restored."""
    hooks = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def last_conv(model: nn.Module, image_size: int = 32) -> tuple[str, nn.Conv2d]:
    """(qualified name, module) of the last nn.Conv2d a forward pass runs (traced, since the order
    modules are registered in need not be the order they run). Its output channels are the
    channels of the last convolutional feature map; in a residual block with a projection
    shortcut the last conv run is the shortcut's, whose channels are the block's."""
    convs = _run_order(model, nn.Conv2d, image_size)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer")
    return convs[-1]


def conv_head(model: nn.Module, image_size: int = 32) -> tuple[nn.Linear, int, int]:
    """The first nn.Linear after the convolutional part, which reads the last conv feature map
    (pooled and flattened channel-major), with the map's channel count C and the number k of
    Linear inputs per channel (1 after global pooling; channel c is inputs [c*k, (c+1)*k)).
    C is read off the last 4-D activation before that Linear runs, not off the last conv: in
    DenseNet and SqueezeNet the map concatenates several convs' outputs."""
    head, c = _head_and_map_channels(model, image_size)
    if head.in_features % c:
        raise ValueError(f"{type(model).__name__}: the first Linear has {head.in_features} inputs, not a multiple of the "
                         f"feature map's {c} channels")
    return head, c, head.in_features // c


def _head_and_map_channels(model: nn.Module, image_size: int) -> tuple[nn.Linear, int]:
    """(first nn.Linear a forward pass runs, channels of the last 4-D module output before it)."""
    state: dict = {"channels": None, "head": None}

    def seen(mod, inp, out):
        if state["head"] is not None:
            return
        if isinstance(mod, nn.Linear):
            state["head"] = mod
        elif isinstance(out, torch.Tensor) and out.dim() == 4:
            state["channels"] = out.shape[1]

    _traced_forward(model, list(model.modules()), seen, image_size)
    if state["head"] is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    if state["channels"] is None:
        raise ValueError(f"{type(model).__name__} has no feature map before its first nn.Linear")
    return state["head"], int(state["channels"])
