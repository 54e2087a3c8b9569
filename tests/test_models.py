"""Model registry: the LfD low-capacity teachers, the BaDLoss Table 5 architectures, parameter
counts, the feature hook point and the cost table."""
import numpy as np
import pytest
import torch
from torch import nn

from poisongrid import config
from poisongrid.costs import GMACS, cost_factor
from poisongrid.errors import ConfigError
from poisongrid.models import MODELS, build_model, parameter_count, penultimate_module
from poisongrid.training import fit, penultimate_features

TEACHERS = ("resnet_s", "resnet_s1", "resnet_s2", "vgg_s", "lenet_s", "mobilenetv2_s")
# Input width of the last Linear (the penultimate feature) per model.
FEATURE_WIDTH = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "smallcnn": 64,
    "resnet_s": 4, "resnet_s1": 1, "resnet_s2": 512, "vgg_s": 512, "lenet_s": 20, "mobilenetv2_s": 16,
    "densenet121": 1024, "vgg16_bn": 4096, "squeezenet1_0": 512,
}
# The BaDLoss paper's Table 5 architectures besides the ResNets.
TABLE5 = ("densenet121", "squeezenet1_0", "vgg16_bn")
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


# One training step through the training loop at 32 px (small-image stems) and 224 px (ImageNet stems).
FIT_CASES = [(n, s) for n in TABLE5 for s in (32, 224)]


@pytest.mark.parametrize("name,size", [pytest.param(n, s, marks=pytest.mark.slow) if (n, s) == ("vgg16_bn", 224)
                                       else (n, s) for n, s in FIT_CASES])
def test_table5_models_train_one_step(name, size):
    torch.set_num_threads(1)
    x = np.random.default_rng(0).integers(0, 256, (2, 3, size, size), dtype=np.uint8)
    y = np.array([3, 7])
    training = {"model": name, "epochs": 1, "batch_size": 2, "lr": 1e-3, "weight_decay": 0.0, "augment": "none"}
    res = fit(training, x, y, 10, seed=0, device=torch.device("cpu"))
    torch.manual_seed(0)  # fit seeds the same way before it builds the model: this is its initial state
    init = build_model(name, 10, size)
    head, head0 = penultimate_module(res.model), penultimate_module(init)
    assert not torch.equal(head.weight, head0.weight), "the optimizer step moved the head"
    res.model.eval()
    with torch.no_grad():
        assert res.model(torch.rand(2, 3, size, size)).shape == (2, 10)
    feats = penultimate_features(res.model, x, torch.device("cpu"))
    assert feats.shape == (2, FEATURE_WIDTH[name]) == (2, head.in_features)


def _map_into(model, module, size):
    seen = []
    h = module.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model.eval()(torch.rand(1, 3, size, size))
    h.remove()
    return tuple(seen[0])


def test_densenet121_stems():
    small, large = build_model("densenet121", 10, 32)[1], build_model("densenet121", 10, 224)[1]
    c0 = small.features.conv0
    assert c0.kernel_size == (3, 3) and c0.stride == (1, 1) and isinstance(small.features.pool0, nn.Identity)
    assert large.features.conv0.kernel_size == (7, 7) and isinstance(large.features.pool0, nn.MaxPool2d)
    # 32 px: three transitions halve 32 to 4 (no stem downsampling); 224 px: 7x7 as in torchvision.
    assert _map_into(small, small.features.norm5, 32) == (1, 1024, 4, 4)
    assert _map_into(large, large.features.norm5, 224) == (1, 1024, 7, 7)


def test_squeezenet1_0_stems_and_head():
    small, large = build_model("squeezenet1_0", 10, 32)[1], build_model("squeezenet1_0", 10, 224)[1]
    assert small.features[0].kernel_size == (3, 3) and small.features[0].stride == (1, 1)
    assert large.features[0].kernel_size == (7, 7) and large.features[0].stride == (2, 2)
    # The 1.0 layout (96-channel stem, three max-pools), not 1.1's (64 channels).
    assert large.features[0].out_channels == small.features[0].out_channels == 96
    assert sum(isinstance(m, nn.MaxPool2d) for m in small.features) == 3
    assert _map_into(small, small.classifier, 32) == (1, 512, 4, 4)
    assert _map_into(large, large.classifier, 224) == (1, 512, 13, 13)
    # Pool-then-Linear equals torchvision's 1x1 conv averaged over positions (before its ReLU).
    head = small.classifier[-1]
    fmap = torch.rand(2, 512, 4, 4)
    conv = nn.functional.conv2d(fmap, head.weight.view(10, 512, 1, 1), head.bias).mean((2, 3))
    assert torch.allclose(small.classifier.eval()(fmap), conv, atol=1e-5)


@pytest.mark.parametrize("size", [32, pytest.param(224, marks=pytest.mark.slow)])
def test_vgg16_bn_classifier_fits_the_map(size):
    net = build_model("vgg16_bn", 10, size)[1]
    convs = _convs(net)
    assert len(convs) == 13 and sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 13
    assert convs[0].kernel_size == (3, 3) and convs[-1].out_channels == 512
    # 32 px: five pools leave 1x1, read as 512 inputs; 224 px: torchvision's 7x7 x 512.
    width = 512 if size == 32 else 512 * 7 * 7
    assert net.classifier[0].in_features == width and _map_into(net, net.classifier[0], size) == (1, width)


@pytest.mark.parametrize("name", TABLE5)
def test_table5_names_validate_in_config(name):
    base = {"datasets": {"digits": {"model": name, "attacks": {"patch": {"ratio": 0.05}}}},
            "defender_models": {"pretrain": {"model": name, "r_epoch": 0.3, "record": "eval"}}}
    c = config.validate(base)
    assert c["datasets"]["digits"]["model"] == name


def test_a_wrong_model_name_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        config.validate({"datasets": {"digits": {"model": "densenet", "attacks": {"patch": {"ratio": 0.05}}}}})
    msg = str(e.value)
    assert "datasets.digits.model" in msg and "densenet" in msg
    assert all(n in msg for n in MODELS.names())


@pytest.mark.parametrize("size", [32, pytest.param(224, marks=pytest.mark.slow)])
def test_cost_table_matches_counted_macs(size):
    from torch.utils.flop_counter import FlopCounterMode

    assert set(GMACS) == set(MODELS.names())
    col = 0 if size == 32 else 1
    for name in MODELS.names():
        model = build_model(name, 10, size).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, 3, size, size))
        assert GMACS[name][col] == pytest.approx(fc.get_total_flops() / 2e9, abs=6e-5), name


def test_cost_factor_scales_up_only():
    assert cost_factor("densenet121", "resnet50", 32) == pytest.approx(0.8884 / 0.3258)
    assert cost_factor("vgg16_bn", "resnet50", 224) == pytest.approx(15.4662 / 4.0872)
    assert cost_factor("squeezenet1_0", "resnet50", 32) == 1.0  # cheaper: the measured time stands
    assert cost_factor("resnet50", "resnet50", 32) == cost_factor("unknown", "resnet50", 32) == 1.0
