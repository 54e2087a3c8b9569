"""Model registry: the LfD low-capacity teachers, parameter counts and the feature hook point."""
import pytest
import torch
from torch import nn

from poisongrid.models import MODELS, build_model, parameter_count, penultimate_module

TEACHERS = ("resnet_s", "resnet_s1", "resnet_s2", "vgg_s", "lenet_s", "mobilenetv2_s")
# Input width of the last Linear (the penultimate feature) per model.
FEATURE_WIDTH = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "smallcnn": 64,
    "resnet_s": 4, "resnet_s1": 1, "resnet_s2": 512, "vgg_s": 512, "lenet_s": 20, "mobilenetv2_s": 16,
}
CASES = [(name, 32) for name in MODELS.names()] + [(name, 224) for name in TEACHERS]


def _convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_every_model_is_covered():
    assert set(FEATURE_WIDTH) == set(MODELS.names())
    assert set(TEACHERS) <= set(MODELS.names())


def test_parameter_counts_order_the_teachers():
    r18 = parameter_count("resnet18")
    assert parameter_count("resnet_s1") < parameter_count("resnet_s") < parameter_count("resnet_s2") < r18
    for name in ("resnet_s", "resnet_s1", "lenet_s", "mobilenetv2_s"):
        assert parameter_count(name) < 0.01 * r18, name
    assert parameter_count("vgg_s") < 0.02 * r18
    assert parameter_count("resnet_s2") < 0.5 * r18
    assert parameter_count("resnet_s", num_classes=100) > parameter_count("resnet_s")


@pytest.mark.parametrize("name,size", CASES)
def test_forward_backward_and_feature_hook(name, size):
    torch.manual_seed(0)
    model = build_model(name, 10, size).train()
    head = penultimate_module(model)
    assert head is [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert head.out_features == 10
    seen = []
    handle = head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    logits = model(torch.rand(2, 3, size, size))
    handle.remove()
    assert logits.shape == (2, 10)
    assert len(seen) == 1 and seen[0].shape == (2, FEATURE_WIDTH[name])
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "name,widths",
    [("resnet_s", (2, 2, 2, 4)), ("resnet_s1", (1, 1, 1, 1)), ("resnet_s2", (64, 128, 256, 512))],
)
def test_resnet_s_widths(name, widths):
    net = build_model(name, 10, 32)[1]
    assert net.stem[0][0].out_channels == widths[0]
    assert len(net.stages) == 4
    for stage, width, stride in zip(net.stages, widths, (1, 2, 2, 2)):
        assert stage.conv1[0].out_channels == stage.conv2[0].out_channels == width
        assert stage.conv1[0].stride == (stride, stride)
    assert net.fc.in_features == widths[-1]


def test_resnet_s_stems():
    small, large = build_model("resnet_s", 10, 32)[1], build_model("resnet_s", 10, 224)[1]
    assert small.stem[0][0].kernel_size == (3, 3) and small.stem[0][0].stride == (1, 1)
    assert large.stem[0][0].kernel_size == (7, 7) and large.stem[0][0].stride == (2, 2)


def test_vgg_s_widths_and_pools():
    model = build_model("vgg_s", 10, 32)
    assert [c.out_channels for c in _convs(model)] == [4, 8, 16, 16, 32, 32, 32, 512]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    # Pools that would go below 1 px are dropped, so tiny images still run.
    tiny = build_model("vgg_s", 10, 8)
    assert sum(isinstance(m, nn.MaxPool2d) for m in tiny.modules()) == 3
    assert tiny(torch.rand(2, 3, 8, 8)).shape == (2, 10)


def test_lenet_s_widths():
    model = build_model("lenet_s", 10, 32)
    convs = _convs(model)
    assert [c.out_channels for c in convs] == [1, 2]
    assert all(c.kernel_size == (5, 5) for c in convs)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [20, 10]


def test_mobilenetv2_s_widths_and_residuals():
    model = build_model("mobilenetv2_s", 10, 32)
    widths = [c.out_channels for c in _convs(model)]
    assert widths == [4, 4, 4, 8, 4, 4, 8, 8, 8, 8, 16]
    blocks = [m for m in model.modules() if hasattr(m, "residual")]
    # Stage 2's first block downsamples, so only its second block is residual.
    assert [b.residual for b in blocks] == [False, False, True]
