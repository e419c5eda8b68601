import pytest
import torch

from greg_fast import models


@pytest.mark.parametrize("name,params", [("resnet20", 269_722), ("resnet32", 464_154),
                                         ("resnet56", 853_018), ("resnet110", 1_727_962)])
def test_cifar_resnets_have_the_papers_sizes(name, params):
    m = models.create(name)
    assert sum(p.numel() for p in m.parameters()) == params
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_shortcuts_are_parameter_free_option_a():
    m = models.create("resnet20")
    sc = m.layer2[0].shortcut
    x = torch.randn(1, 16, 8, 8)
    y = sc(x)
    assert y.shape == (1, 32, 4, 4) and not list(sc.parameters())
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and y[:, :8].abs().sum() == 0


def test_vgg19_cifar_and_num_classes_and_in_channels():
    m = models.create("vgg19_bn_cifar", num_classes=100)
    assert sum(isinstance(l, torch.nn.Conv2d) for l in m.modules()) == 16
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    r = models.create("resnet20", in_channels=1)
    assert r(torch.randn(2, 1, 8, 8)).shape == (2, 10) and r.greg_input_size == (1, 32, 32)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16_bn"])
def test_torchvision_models(name):
    m = models.create(name, num_classes=7, in_channels=1).eval()
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 7)
    assert m.greg_input_size == (1, 224, 224)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet7'.*resnet56"):
        models.create("resnet7")
