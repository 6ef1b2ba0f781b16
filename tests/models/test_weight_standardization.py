"""Weight standardisation (common/models/layers.py WSConv2d): the forward, and per-sample gradients that
equal one-example-at-a-time gradients in every engine that supports it; the 'ew' engine is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights
from torch import nn

from fedrad.client.training.dp_engine import make_dp_step
from fedrad.common.errors import ModelError
from fedrad.common.models import build_model
from fedrad.common.models.layers import WSConv2d

WS_MODELS = [
    ("cnn", {"widths": [4, 8], "dense": 8, "dropout": 0.0, "weight_standardization": True}),
    ("resnet", {"width": 4, "blocks": [1, 1], "weight_standardization": True}),
]


def _one_at_a_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(len(x)):
        m = copy.deepcopy(model)
        F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    return torch.stack(rows)


def _data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_ws_conv_uses_a_standardised_weight() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(3, 5, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(3.0)  # scale and shift do not change a standardised weight
    x = torch.rand(2, 3, 8, 8)
    w = conv.weight
    ref = F.conv2d(x, (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), unbiased=False, keepdim=True), padding=1)

    torch.testing.assert_close(conv(x), ref, rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, WSConv2d) for m in build_model("cnn", in_channels=1, num_classes=2, image_size=28,
                                                             options=WS_MODELS[0][1]).modules())


@pytest.mark.parametrize(("name", "options"), WS_MODELS)
@pytest.mark.parametrize("functorch", [False, True])
def test_opacus_per_sample_gradients_equal_one_at_a_time(name: str, options: dict, functorch: bool) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=2, image_size=28, options=options)
    x, y = _data()
    expected = _one_at_a_time(model, x, y)
    gsm_model = copy.deepcopy(model)
    gsm = GradSampleModule(gsm_model, loss_reduction="mean", force_functorch=functorch)

    F.cross_entropy(gsm(x), y).backward()  # mean reduction: Opacus rescales to per-sample gradients
    got = torch.stack([torch.cat([p.grad_sample[i].flatten() for p in gsm_model.parameters()])
                       for i in range(len(x))])

    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), expected.norm(dim=1), rtol=1e-4, atol=1e-5)


def test_fedrad_mixed_engine_norms_equal_one_at_a_time() -> None:
    torch.manual_seed(0)
    model = build_model(*WS_MODELS[0][0:1], in_channels=1, num_classes=2, image_size=28, options=WS_MODELS[0][1])
    x, y = _data()
    expected = _one_at_a_time(model, x, y).norm(dim=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    with make_dp_step(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=6.0,
                      generator=torch.Generator().manual_seed(0)) as step:
        got = step.per_sample_norms(x, y)

    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_expanded_weights_engine_is_refused() -> None:
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=28, options=WS_MODELS[0][1])
    x, y = _data(2)

    with pytest.raises(ModelError, match="grad_sample_mode"):
        F.cross_entropy(GradSampleModuleExpandedWeights(model)(x), y).backward()


def test_plain_models_are_unchanged_by_default() -> None:
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=28)
    assert not any(isinstance(m, WSConv2d) for m in model.modules())
