"""Model registry (common/models): Opacus compatibility, shapes, errors."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedrad.common.errors import ModelError
from fedrad.common.models import MODELS, build_model, count_parameters

# Small options keep the forward passes fast; resnet18 takes none.
_FAST_OPTIONS = {"cnn": {}, "resnet": {"width": 8}, "resnet18": {}}


def test_registry_holds_the_documented_models() -> None:
    assert {"cnn", "resnet", "resnet18"} <= set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_is_opacus_valid_without_batchnorm(name: str) -> None:
    model = build_model(name, in_channels=1, num_classes=2, image_size=28, options=_FAST_OPTIONS.get(name, {}))

    ModuleValidator.validate(model, strict=True)  # raises if not DP-compatible
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("image_size", [28, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shape(name: str, image_size: int, channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(
        name, in_channels=channels, num_classes=3, image_size=image_size, options=_FAST_OPTIONS.get(name, {})
    ).eval()
    x = torch.rand(2, channels, image_size, image_size)

    with torch.no_grad():
        out = model(x)

    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()


def test_large_input_stem_shape() -> None:
    model = build_model("resnet", in_channels=1, num_classes=2, image_size=128, options={"width": 4}).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 128, 128)).shape == (1, 2)


def test_unknown_model_name() -> None:
    with pytest.raises(ModelError, match="unknown model 'alexnet'"):
        build_model("alexnet", in_channels=1, num_classes=2, image_size=28)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("cnn", {"depth": 3}, r"unknown option\(s\) \['depth'\]"),
        ("resnet18", {"width": 32}, r"unknown option\(s\) \['width'\]"),
        ("resnet", {"width": 6}, "multiple of 4"),
        ("cnn", {"widths": []}, "at least one conv block"),
    ],
)
def test_bad_options_raise_model_error(name: str, options: dict, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        build_model(name, in_channels=1, num_classes=2, image_size=28, options=options)


def test_resnet18_has_about_11m_parameters() -> None:
    model = build_model("resnet18", in_channels=3, num_classes=2, image_size=64)

    n = count_parameters(model)

    assert 10.5e6 <= n <= 11.5e6, n


def test_demo_cnn_is_small() -> None:
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [16, 32, 64], "dense": 64})
    assert count_parameters(model) < 200_000
