"""fedrad.client.training.dp_engine against Opacus' ``ew`` engine: same norms, same clipped sums, same noise.

Reference: Opacus' expanded-weights engine (``grad_sample_mode="ew"``) and its ``DPOptimizer``, as
fedrad trains today. Every comparison runs the real code paths of both on the same batch; the
noise generator is seeded identically in the test only (a node seeds it from OS entropy).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from fedrad.client.training.dp_engine import MODES, make_dp_step, norm_samplers
from fedrad.client.training.dp_engine.mixed import layer_cost_table
from fedrad.common.errors import PrivacyError
from fedrad.common.models import build_model

RTOL, ATOL = 1e-4, 1e-6


class Flat(nn.Module):
    """A single layer followed by a flattening linear head (so every layer type gets a real loss)."""

    def __init__(self, layer: nn.Module, out_features: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(out_features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layer(x)).flatten(1))


def _layer_cases() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """name -> (layer, input shape without batch)."""
    return {
        "conv3x3": (nn.Conv2d(3, 4, 3, padding=1, bias=False), (3, 6, 6)),
        "conv-stride2-bias": (nn.Conv2d(2, 5, 3, stride=2, padding=1), (2, 7, 7)),
        "conv1x1-stride2": (nn.Conv2d(4, 6, 1, stride=2, bias=False), (4, 6, 6)),
        "conv7x7-dilated": (nn.Conv2d(1, 3, 3, padding=2, dilation=2), (1, 8, 8)),
        "conv-groups": (nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 5)),
        "conv-padding-same": (nn.Conv2d(2, 3, 3, padding="same"), (2, 5, 5)),
        "groupnorm": (nn.GroupNorm(2, 4), (4, 3, 3)),
        "linear": (nn.Linear(7, 5), (7,)),
        "linear-sequence": (nn.Linear(4, 3), (6, 4)),
    }


def _out_features(layer: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return layer(torch.zeros(1, *shape)).numel()


def _batch(shape: tuple[int, ...], b: int, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g), torch.randint(0, classes, (b,), generator=g)


def _ew_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, noise: float, clip: float,
                  ebs: float, seed: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(per-sample total norms, clipped sums, noised p.grad) per parameter from Opacus ew + DPOptimizer."""
    gsm = prepare_module(model, grad_sample_mode="ew", wrap_model=True, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=noise, max_grad_norm=clip,
                      expected_batch_size=ebs, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(gsm(x), y).backward()
    norms = torch.stack([p.grad_sample.reshape(len(x), -1).norm(2, dim=1) for p in opt.params], dim=1).norm(2, dim=1)
    opt.step()
    params = list(model.parameters())
    return norms, [p.summed_grad.detach().clone() for p in params], [p.grad.detach().clone() for p in params]


def _engine_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, noise: float, clip: float, ebs: float,
                seed: int, mode: str) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The same three from the engine (the clipped sum is what its DP optimizer noised)."""
    dp = make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=noise,
                      max_grad_norm=clip, expected_batch_size=ebs, generator=torch.Generator().manual_seed(seed),
                      mode=mode)  # type: ignore[arg-type]
    try:
        norms = dp.per_sample_norms(x, y)
        dp.step(x, y)
        params = list(model.parameters())
        clipped = [p.summed_grad.detach().clone() for p in params]  # type: ignore[attr-defined]
    finally:
        dp.close()
    return norms, clipped, [p.grad.detach().clone() for p in params]


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


# ---- per layer type ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(_layer_cases()))
def test_layer_norms_clipped_and_noisy_gradient_equal_ew(case: str) -> None:
    # arrange
    torch.manual_seed(0)
    layer, shape = _layer_cases()[case]
    model = Flat(layer, _out_features(layer, shape))
    x, y = _batch(shape, 5)
    norms, _, _ = _ew_reference(copy.deepcopy(model), x, y, noise=0.0, clip=1.0, ebs=1.0, seed=0)
    clip = float(norms.median())  # some samples clipped, some not
    # act
    want = _ew_reference(copy.deepcopy(model), x, y, noise=0.7, clip=clip, ebs=4.5, seed=3)
    got = {mode: _engine_run(copy.deepcopy(model), x, y, noise=0.7, clip=clip, ebs=4.5, seed=3, mode=mode)
           for mode in MODES}
    # assert
    assert (want[0] > clip).any() and (want[0] < clip).any()
    for mode in MODES:
        torch.testing.assert_close(got[mode][0], want[0], rtol=RTOL, atol=ATOL, msg=lambda m: f"{mode}: {m}")
        _assert_same(got[mode][1], want[1])
        _assert_same(got[mode][2], want[2])


@pytest.mark.parametrize("case", ["conv3x3", "conv-stride2-bias", "conv-groups", "conv1x1-stride2", "groupnorm"])
def test_registered_norm_samplers_drive_opacus_ghost_clipping(case: str) -> None:
    """Opacus' own ghost clipping, with fedrad's registered samplers, reproduces ew's norms."""
    # arrange
    torch.manual_seed(0)
    layer, shape = _layer_cases()[case]
    model = Flat(layer, _out_features(layer, shape))
    ref = copy.deepcopy(model)
    x, y = _batch(shape, 4)
    want_norms, _, _ = _ew_reference(ref, x, y, noise=0.0, clip=1.0, ebs=4, seed=0)
    gsm = prepare_module(model, grad_sample_mode="ghost", wrap_model=True, batch_first=True,
                         loss_reduction="mean", max_grad_norm=1.0)
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                                          max_grad_norm=1.0, expected_batch_size=4)
    crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), "mean")
    # act
    crit(gsm(x), y).backward()
    # assert
    torch.testing.assert_close(gsm.per_sample_gradient_norms, want_norms, rtol=RTOL, atol=ATOL)


def test_norm_samplers_are_registered_with_opacus() -> None:
    registry = GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    assert registry[nn.Conv2d] is norm_samplers.compute_conv2d_norm_sample
    assert registry[nn.GroupNorm] is norm_samplers.compute_group_norm_norm_sample
    assert nn.Conv2d in GradSampleModule.GRAD_SAMPLERS  # Opacus' own per-sample samplers untouched


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, groups=2)])
def test_ghost_norm_equals_materialised_norm(conv: nn.Conv2d) -> None:
    a, g = torch.randn(3, conv.in_channels, 9, 9), None
    with torch.no_grad():
        g = torch.randn_like(conv(a))
    ghost = norm_samplers.conv2d_weight_ghost_norm2(conv, a, g)
    materialised = norm_samplers.conv2d_weight_grad_sample(conv, a, g).reshape(3, -1).pow(2).sum(1)
    torch.testing.assert_close(ghost, materialised, rtol=RTOL, atol=ATOL)


# ---- fedrad's models ---------------------------------------------------------------------------------

MODELS = {
    "cnn": ("cnn", 16, {"widths": [4, 8], "dense": 8, "dropout": 0.0}),
    "resnet": ("resnet", 16, {"width": 4}),
    "resnet-large-stem": ("resnet", 128, {"width": 4, "blocks": [1, 1, 1, 1]}),
    "resnet18": ("resnet18", 16, None),
}


SLOW = pytest.mark.slow


@pytest.mark.parametrize(("name", "mode"), [
    ("cnn", "mixed"), ("cnn", "ghost"), ("cnn", "per-sample"), ("resnet", "mixed"),
    pytest.param("resnet", "ghost", marks=SLOW), pytest.param("resnet", "per-sample", marks=SLOW),
    pytest.param("resnet-large-stem", "mixed", marks=SLOW), pytest.param("resnet18", "mixed", marks=SLOW),
])
def test_model_norms_clipped_and_noised_gradient_equal_ew(name: str, mode: str) -> None:
    # arrange
    model_name, size, options = MODELS[name]
    torch.manual_seed(1)
    model = build_model(model_name, in_channels=1, num_classes=2, image_size=size, options=options).train()
    b = 4 if size <= 16 else 2
    x, y = _batch((1, size, size), b, classes=2, seed=2)
    # act
    want_norms, want_clipped, want_noisy = _ew_reference(copy.deepcopy(model), x, y, noise=1.3, clip=0.3, ebs=5.0,
                                                         seed=11)
    got_norms, got_clipped, got_noisy = _engine_run(model, x, y, noise=1.3, clip=0.3, ebs=5.0, seed=11, mode=mode)
    # assert
    torch.testing.assert_close(got_norms, want_norms, rtol=RTOL, atol=ATOL)
    _assert_same(got_clipped, want_clipped)
    _assert_same(got_noisy, want_noisy)


def test_training_steps_match_ew_with_momentum() -> None:
    """Several real optimizer steps (momentum SGD) end at the same weights as Opacus ew."""
    # arrange
    _, size, options = MODELS["cnn"]
    torch.manual_seed(4)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=size, options=options)
    ref = copy.deepcopy(model)
    gsm = prepare_module(ref, grad_sample_mode="ew", wrap_model=True, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), noise_multiplier=0.8,
                      max_grad_norm=1.0, expected_batch_size=4.0, generator=torch.Generator().manual_seed(5))
    dp = make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), noise_multiplier=0.8,
                      max_grad_norm=1.0, expected_batch_size=4.0, generator=torch.Generator().manual_seed(5))
    # act
    for i, b in enumerate([5, 2]):
        x, y = _batch((1, size, size), b, classes=2, seed=10 + i)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y).backward()
        opt.step()
        loss = dp.step(x, y)
        assert loss.shape == () and torch.isfinite(loss)
    dp.close()
    # assert
    _assert_same([p.detach() for p in model.parameters()], [p.detach() for p in ref.parameters()])


# ---- empty batch, noise, sensitivity ------------------------------------------------------------------

def test_empty_batch_is_a_noise_only_step_like_opacus() -> None:
    # arrange
    _, size, options = MODELS["cnn"]
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=size, options=options)
    ref = copy.deepcopy(model)
    prepare_module(ref, grad_sample_mode="ew", wrap_model=True, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(ref.parameters(), lr=0.0), noise_multiplier=1.1, max_grad_norm=0.7,
                      expected_batch_size=3.0, generator=torch.Generator().manual_seed(8))
    dp = make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.1, max_grad_norm=0.7,
                      expected_batch_size=3.0, generator=torch.Generator().manual_seed(8))
    # act: Opacus' own empty-batch path (zero per-sample gradients) and the engine's
    for p in opt.params:
        p.grad_sample = torch.zeros((0, *p.shape))
    opt.step()
    loss = dp.step(torch.zeros(0, 1, size, size), torch.zeros(0, dtype=torch.long))
    # assert
    assert float(loss) == 0.0
    _assert_same([p.grad for p in model.parameters()], [p.grad for p in ref.parameters()])
    assert all(float(p.grad.abs().sum()) > 0 for p in model.parameters())  # the noise is there


def test_noise_standard_deviation_is_sigma_times_clip_over_batch() -> None:
    # arrange: a zero-gradient model direction is impossible to isolate, so use an empty batch
    model = nn.Sequential(nn.Linear(200, 100))
    dp = make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=2.0, max_grad_norm=1.5,
                      expected_batch_size=6.0, generator=torch.Generator().manual_seed(0))
    # act
    dp.noise_step()
    # assert: 20,100 draws; std within 3% of sigma * C / B = 0.5
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert abs(float(grads.std()) - 0.5) < 0.015
    assert abs(float(grads.mean())) < 0.015


def test_one_example_moves_the_clipped_sum_by_at_most_the_clip_norm() -> None:
    """Sensitivity: adding one (large-gradient) example changes the clipped sum by <= C."""
    # arrange
    _, size, options = MODELS["cnn"]
    torch.manual_seed(6)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=size, options=options)
    x, y = _batch((1, size, size), 5, classes=2, seed=6)
    x[-1] *= 50.0

    def clipped_sum(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        m = copy.deepcopy(model)
        dp = make_dp_step(m, torch.optim.SGD(m.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=0.25,
                          expected_batch_size=1.0, generator=torch.Generator())
        dp.step(xb, yb)
        dp.close()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    # act
    with_it, without = clipped_sum(x, y), clipped_sum(x[:-1], y[:-1])
    # assert
    assert float((with_it - without).norm()) <= 0.25 * (1 + 1e-5)
    assert float((with_it - without).norm()) > 0.2  # it was clipped, not tiny


# ---- the cost model ----------------------------------------------------------------------------------

def test_mixed_plan_picks_per_sample_for_large_maps_and_ghost_for_dense_layers() -> None:
    model = build_model("resnet", in_channels=1, num_classes=2, image_size=128)  # ResNet-18 layout, width 16
    plan = {name: ghost for name, _, _, _, _, ghost in layer_cost_table(model, torch.zeros(1, 1, 128, 128))}
    assert plan["stem.0"] is False and plan["stages.0.conv1"] is False  # T = 4096, 1024 positions
    assert plan["stages.7.conv2"] is True and plan["stages.4.conv1"] is True  # T = 16, 64 positions
    assert plan["fc"] is True
    assert norm_samplers.prefer_ghost(positions=1, fan_in=8192, fan_out=128)
    assert not norm_samplers.prefer_ghost(positions=4096, fan_in=9, fan_out=32)


# ---- misuse fails hard --------------------------------------------------------------------------------

def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3))


@pytest.mark.parametrize("kwargs", [
    {"generator": None},
    {"noise_multiplier": -1.0},
    {"noise_multiplier": float("nan")},
    {"max_grad_norm": 0.0},
    {"expected_batch_size": 0.0},
    {"expected_batch_size": True},
    {"mode": "fast"},
])
def test_bad_arguments_are_refused(kwargs: dict[str, object]) -> None:
    model = _tiny()
    args: dict[str, object] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": 4.0,
                               "generator": torch.Generator(), **kwargs}
    with pytest.raises(PrivacyError):
        make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), **args)  # type: ignore[arg-type]


def test_arguments_are_keyword_only() -> None:
    model = _tiny()
    with pytest.raises(TypeError):
        make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 1.0, 4.0,  # type: ignore[misc]
                     torch.Generator())


def test_model_and_optimizer_misuse_is_refused() -> None:
    common = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": 4.0,
              "generator": torch.Generator()}
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(PrivacyError):
        make_dp_step(bn, torch.optim.SGD(bn.parameters(), lr=0.1), **common)  # type: ignore[arg-type]
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(PrivacyError):  # optimizer misses a layer: it would train un-noised... or not at all
        make_dp_step(model, torch.optim.SGD(model[0].parameters(), lr=0.1), **common)  # type: ignore[arg-type]
    opacus_opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                             expected_batch_size=4)
    with pytest.raises(PrivacyError):
        make_dp_step(model, opacus_opt, **common)  # type: ignore[arg-type]

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    odd = nn.Sequential(Scale(), nn.Linear(4, 2))
    with pytest.raises(PrivacyError, match="Scale"):
        make_dp_step(odd, torch.optim.SGD(odd.parameters(), lr=0.1), **common)  # type: ignore[arg-type]


def test_shared_layer_and_batch_loss_are_refused() -> None:
    common = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": 4.0,
              "generator": torch.Generator()}
    lin = nn.Linear(4, 4)
    shared = nn.Sequential(lin, nn.Tanh(), lin)
    dp = make_dp_step(shared, torch.optim.SGD(shared.parameters(), lr=0.1), **common)  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="twice"):
        dp.step(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    model = _tiny()
    dp = make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      loss_fn=lambda out, y: F.cross_entropy(out, y), **common)  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="per sample"):
        dp.step(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_close_removes_hooks_and_state() -> None:
    model = _tiny()
    dp = make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4.0, generator=torch.Generator())
    dp.step(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    dp.close()
    assert all(not m._forward_hooks for m in model.modules())
    assert all(getattr(p, "summed_grad", None) is None for p in model.parameters())


# ---- augmentation multiplicity (views) and per-example weights -------------------------------------------

def _clip_of_mean_views(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, views: int, clip: float,
                        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference, one example and one view at a time with plain autograd: each example's gradient
    is the mean of its views' gradients; clip it (Opacus' factor), weight it, sum over examples."""
    params = [p for p in model.parameters() if p.requires_grad]
    examples = []
    for i in range(len(y)):
        per_view = []
        for k in range(views):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i * views + k: i * views + k + 1]), y[i: i + 1]).backward()
            per_view.append([p.grad.detach().clone() for p in params])
        examples.append([torch.stack(gs).mean(dim=0) for gs in zip(*per_view)])
    norms = torch.stack([torch.cat([g.flatten() for g in ex]).norm() for ex in examples])
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    if weights is not None:
        coef = coef * weights
    summed = [sum(c * g for c, g in zip(coef, gs)) for gs in zip(*examples)]
    return norms, summed  # type: ignore[return-value]


VIEW_CASES = ["conv3x3", "conv-stride2-bias", "conv-groups", "conv-padding-same", "groupnorm", "linear",
              "linear-sequence"]


@pytest.mark.parametrize("case", VIEW_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_views_clip_the_mean_of_the_views_gradients(case: str, mode: str) -> None:
    # arrange: 4 examples x 3 views (example-major rows), weights that differ per example
    torch.manual_seed(0)
    layer, shape = _layer_cases()[case]
    model = Flat(layer, _out_features(layer, shape))
    x, _ = _batch(shape, 12, seed=5)
    y = torch.tensor([0, 2, 1, 2])
    w = torch.tensor([1.0, 0.5, 0.25, 1.0])
    norms, _ = _clip_of_mean_views(copy.deepcopy(model), x, y, views=3, clip=1.0)
    clip = float(norms.median())
    _, want = _clip_of_mean_views(copy.deepcopy(model), x, y, views=3, clip=clip, weights=w)
    dp = make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                      max_grad_norm=clip, expected_batch_size=4.0, generator=torch.Generator(),
                      mode=mode, views=3)  # type: ignore[arg-type]
    # act
    got_norms = dp.per_sample_norms(x, y)
    dp.step(x, y, weights=w)
    got = [p.summed_grad.detach().clone() for p in model.parameters()]  # type: ignore[attr-defined]
    dp.close()
    # assert
    assert (norms > clip).any() and (norms < clip).any()
    torch.testing.assert_close(got_norms, norms, rtol=RTOL, atol=ATOL)
    _assert_same(got, want)


@pytest.mark.parametrize(("name", "mode"), [("cnn", "mixed"), ("cnn", "ghost"), ("resnet", "mixed"),
                                            pytest.param("resnet", "per-sample", marks=SLOW)])
def test_model_views_equal_reference_and_opacus_ew_with_views(name: str, mode: str) -> None:
    """Clipped and noised gradients with K=3 views: engine == per-example reference == Opacus ew
    with fedrad's view folding (WeightedDPOptimizer.views), same noise generator state."""
    from fedrad.client.training.train import WeightedDPOptimizer

    # arrange
    model_name, size, options = MODELS[name]
    torch.manual_seed(3)
    model = build_model(model_name, in_channels=1, num_classes=2, image_size=size, options=options).train()
    x, _ = _batch((1, size, size), 9, classes=2, seed=4)
    y = torch.tensor([0, 1, 1])
    w = torch.tensor([0.5, 1.0, 0.75])
    _, want_clipped = _clip_of_mean_views(copy.deepcopy(model), x, y, views=3, clip=0.3, weights=w)
    ref = copy.deepcopy(model)
    gsm = prepare_module(ref, grad_sample_mode="ew", wrap_model=True, batch_first=True, loss_reduction="mean")
    opt = WeightedDPOptimizer(torch.optim.SGD(ref.parameters(), lr=0.0), noise_multiplier=1.3, max_grad_norm=0.3,
                              expected_batch_size=5.0, generator=torch.Generator().manual_seed(11))
    opt.views, opt.sample_weights = 3, w
    dp = make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.3, max_grad_norm=0.3,
                      expected_batch_size=5.0, generator=torch.Generator().manual_seed(11), mode=mode,
                      views=3)  # type: ignore[arg-type]
    # act
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(gsm(x), y.repeat_interleave(3)).backward()
    opt.step()
    dp.step(x, y, weights=w)
    got_clipped = [p.summed_grad.detach().clone() for p in model.parameters()]  # type: ignore[attr-defined]
    dp.close()
    # assert
    _assert_same(got_clipped, want_clipped)
    _assert_same([p.summed_grad for p in ref.parameters()], want_clipped)  # type: ignore[attr-defined]
    _assert_same([p.grad for p in model.parameters()], [p.grad for p in ref.parameters()])


def test_one_view_is_todays_engine_exactly() -> None:
    _, size, options = MODELS["cnn"]
    torch.manual_seed(6)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=size, options=options)
    x, y = _batch((1, size, size), 5, classes=2, seed=6)
    grads = []
    for kwargs in ({}, {"views": 1}):
        m = copy.deepcopy(model)
        dp = make_dp_step(m, torch.optim.SGD(m.parameters(), lr=0.0), noise_multiplier=0.9, max_grad_norm=0.2,
                          expected_batch_size=5.0, generator=torch.Generator().manual_seed(1), **kwargs)
        dp.step(x, y)
        dp.close()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_weighted_contributions_never_exceed_the_clip_norm() -> None:
    # arrange: one huge-gradient example, weight 1 and weight 0.3
    _, size, options = MODELS["cnn"]
    torch.manual_seed(7)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=size, options=options)
    x, y = _batch((1, size, size), 4, classes=2, seed=7)
    x[-1] *= 50.0

    def clipped_sum(n: int, w: torch.Tensor) -> torch.Tensor:
        m = copy.deepcopy(model)
        dp = make_dp_step(m, torch.optim.SGD(m.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=0.25,
                          expected_batch_size=1.0, generator=torch.Generator())
        dp.step(x[:n], y[:n], weights=w[:n])
        dp.close()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    # act
    full = clipped_sum(4, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    light = clipped_sum(4, torch.tensor([1.0, 1.0, 1.0, 0.3]))
    without = clipped_sum(3, torch.ones(4))
    # assert
    assert float((full - without).norm()) == pytest.approx(0.25, rel=1e-4)
    assert float((light - without).norm()) == pytest.approx(0.3 * 0.25, rel=1e-4)


@pytest.mark.parametrize("bad", [torch.tensor([1.0, 1.5, 1.0]), torch.tensor([1.0, -0.1, 1.0]),
                                 torch.tensor([1.0, float("nan"), 1.0]), torch.tensor([1.0, 1.0])])
def test_bad_weights_and_view_counts_are_refused(bad: torch.Tensor) -> None:
    model = _tiny()
    dp = make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4.0, generator=torch.Generator(), views=2)
    with pytest.raises(PrivacyError):
        dp.step(torch.randn(6, 4), torch.tensor([0, 1, 2]), weights=bad)
    with pytest.raises(PrivacyError, match="view"):
        dp.step(torch.randn(5, 4), torch.tensor([0, 1, 2]))
    for views in (0, True, 1.5):
        with pytest.raises(PrivacyError):
            make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=4.0, generator=torch.Generator(),
                         views=views)  # type: ignore[arg-type]


def test_group_norm_reuses_the_forward_statistics_exactly() -> None:
    # arrange
    gn = nn.GroupNorm(2, 4)
    a = torch.randn(3, 4, 5, 5)
    out = gn(a)
    g = torch.randn_like(out)
    # act
    stats = norm_samplers.group_norm_forward_stats(gn, out)
    reused = norm_samplers.group_norm_grad_sample(gn, [a], g, stats=stats)
    recomputed = norm_samplers.group_norm_grad_sample(gn, [a], g)
    # assert
    assert stats is not None and stats[0].shape == (3, 2)
    for p in (gn.weight, gn.bias):
        torch.testing.assert_close(reused[p], recomputed[p], rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        assert norm_samplers.group_norm_forward_stats(gn, gn(a)) is None  # no autograd record: recompute
