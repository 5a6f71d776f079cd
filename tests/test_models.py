import pytest
import torch
import torch.nn.functional as F

from suspects.models import (
    INTERFACE_METHODS,
    InspectableModel,
    ModelInterfaceError,
    create_model,
    get_skip_gammas,
    list_models,
    list_residual_blocks,
    model_api,
    penultimate_features,
    reset_skip_gammas,
    residual_blocks,
    set_skip_gamma,
)

BLOCKS = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def test_registry():
    assert {"preact_resnet18", "resnet18", "vgg11_bn"} <= set(list_models())
    assert list_models("resnet*") == ["resnet18", "resnet18_torchvision"]
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("resnet1000")


def test_preact_resnet18_uses_backdoorbench_names():
    m = create_model("preact_resnet18", num_classes=10, width=64)
    keys = set(m.state_dict())
    for k in ["conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.running_mean",
              "layer1.0.conv2.weight", "layer2.0.shortcut.0.weight", "layer4.0.shortcut.0.weight",
              "linear.weight", "linear.bias"]:
        assert k in keys, k
    assert not any(k.startswith("layer1.0.shortcut") or k.startswith("layer2.1.shortcut") for k in keys)
    assert not any(k.startswith("bn.") or k.startswith("normalize") for k in keys)  # no final BN, norm not saved
    assert m.linear.in_features == 512
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(11.17e6, rel=0.01)


def test_resnet18_cifar_style():
    m = create_model("resnet18", num_classes=7, in_channels=1, width=8)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(mod, torch.nn.MaxPool2d) for mod in m.modules())
    assert "layer1.0.shortcut" in dict(m.named_modules())
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("arch", ["preact_resnet18", "resnet18"])
def test_residual_blocks_are_listed(arch):
    m = create_model(arch, width=4)
    assert list_residual_blocks(m) == BLOCKS


def _plain_preact_block(block, x):
    out = F.relu(block.bn1(x))
    skip = block.shortcut(out) if hasattr(block, "shortcut") else x
    return block.conv2(F.relu(block.bn2(block.conv1(out)))) + skip


def test_gamma_one_is_exactly_the_plain_forward_and_gamma_zero_changes_it():
    torch.manual_seed(0)
    m = create_model("preact_resnet18", num_classes=10, in_channels=1, width=8).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        h = m.conv1(m.normalize(x))
        for name in BLOCKS:
            h = _plain_preact_block(dict(m.named_modules())[name], h)
        plain = m.linear(torch.flatten(m.avgpool(h), 1))
        assert torch.equal(m(x), plain)
        set_skip_gamma(m, "layer3.1", 0.0)
        assert get_skip_gammas(m, non_default_only=True) == {"layer3.1": 0.0}
        changed = m(x)
        assert not torch.allclose(changed, plain)
        set_skip_gamma(m, "layer3.1", 0.5)
        half = m(x)
        assert not torch.allclose(half, plain) and not torch.allclose(half, changed)
        reset_skip_gammas(m)
        assert torch.equal(m(x), plain)
    with pytest.raises(KeyError, match="no residual block"):
        set_skip_gamma(m, "layer9.0", 0.0)


def test_network_without_skips():
    m = create_model("vgg11_bn", num_classes=10, in_channels=1, width=8).eval()
    assert list_residual_blocks(m) == []
    x = torch.rand(2, 1, 28, 28)
    assert m(x).shape == (2, 10)
    assert penultimate_features(m, x).shape == (2, 64)


def test_normalisation_is_part_of_the_model():
    m = create_model("preact_resnet18", width=4, in_channels=1, mean=[0.3], std=[0.2])
    x = torch.full((1, 1, 8, 8), 0.5)
    assert torch.allclose(m.normalize(x), torch.full_like(x, 1.0))
    with pytest.raises(ValueError, match="one per input channel"):
        create_model("preact_resnet18", in_channels=3, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=1)


@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_implements_the_model_interface(arch):
    torch.manual_seed(0)
    m = create_model(arch, num_classes=5, in_channels=1, width=8).eval()
    assert isinstance(m, InspectableModel) and model_api(m) is m
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        fmap = m.forward_features(x)
        lin = m.get_classifier()
        assert isinstance(lin, torch.nn.Linear) and lin.out_features == 5
        assert fmap.dim() == 4 and fmap.shape[:2] == (3, lin.in_features)
        pre = m.forward_head(fmap, pre_logits=True)
        assert pre.shape == (3, lin.in_features)
        assert torch.allclose(pre, fmap.mean((2, 3)), atol=1e-6)  # global average pooling
        logits = m(x)
        assert torch.equal(m.forward_head(fmap), logits) and torch.allclose(lin(pre), logits, atol=1e-6)
        assert torch.equal(penultimate_features(m, x), pre)
        # the named feature layer's output is the feature map (what Fine-Pruning and l_inf pruning hook)
        seen = []
        hook = dict(m.named_modules())[m.feature_layer()].register_forward_hook(lambda mod, i, o: seen.append(o))
        m(x)
        hook.remove()
        assert torch.equal(seen[0], fmap)
        # blocks(): the named residual blocks with their skip scales; the stem followed by them is the trunk
        blocks = m.blocks()
        assert [n for n, _ in blocks] == list_residual_blocks(m) == [n for n, _ in residual_blocks(m)]
        assert all(b.gamma == 1.0 for _, b in blocks)
        if blocks:
            assert [n for n, _ in blocks] == BLOCKS and m.feature_layer() == BLOCKS[-1]
            h = m.forward_stem(x)
            for _, b in blocks:
                h = b(h)
            assert torch.equal(h, fmap)
        else:
            assert arch == "vgg11_bn"


def test_a_model_without_the_interface_is_refused_by_name():
    from defenses.common import head, last_feature_layer

    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert not isinstance(plain, InspectableModel)
    with pytest.raises(ModelInterfaceError, match="missing " + ", ".join(INTERFACE_METHODS)):
        model_api(plain)
    for call in (lambda: penultimate_features(plain, torch.rand(1, 4)), lambda: list_residual_blocks(plain),
                 lambda: head(plain), lambda: last_feature_layer(plain)):
        with pytest.raises(ModelInterfaceError, match="InspectableModel"):
            call()

    class Partial(torch.nn.Module):
        def forward_features(self, x):
            return x

        def get_classifier(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"missing forward_stem, forward_head, blocks, feature_layer\."):
        model_api(Partial())
