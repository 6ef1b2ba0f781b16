"""The DP engine's faster paths (issue 14) give the numbers of the paths they replace.

- :func:`norm_samplers.unfold2d` equals ``F.unfold`` exactly;
- the unfold+bmm per-sample convolution gradient equals the grouped-kernel one (with views);
- a model whose convolutions take both per-sample paths equals Opacus ``ew`` (clipped and noised
  gradients, same noise generator state in the test only), and the clipping bound holds per sample;
- GroupNorm's forward statistics are captured in the forward pass (never recomputed);
- :class:`LeanNoiseOptimizer` produces bitwise the noisy gradient of Opacus'
  ``DPOptimizerFastGradientClipping``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

from fedrad.client.training.dp_engine import MODES, make_dp_step, norm_samplers
from fedrad.client.training.dp_engine.step import LeanNoiseOptimizer

RTOL, ATOL = 1e-4, 1e-6

CONVS = {
    "3x3": nn.Conv2d(3, 4, 3, padding=1),
    "stem-7x7-stride2": nn.Conv2d(1, 4, 7, stride=2, padding=3, bias=False),
    "rect-kernel-asym-padding": nn.Conv2d(2, 3, (3, 5), stride=(2, 1), padding=(0, 2)),
    "dilated": nn.Conv2d(2, 3, 3, padding=2, dilation=2),
    "groups": nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "1x1-stride2": nn.Conv2d(6, 2, 1, stride=2),
    "wide": nn.Conv2d(8, 5, 3, padding=1),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_unfold2d_equals_torch_unfold(name: str) -> None:
    # arrange
    conv = CONVS[name]
    a = torch.randn(3, conv.in_channels, 9, 11)
    # act
    got = norm_samplers.unfold2d(conv, a)
    want = F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,  # type: ignore[arg-type]
                    stride=conv.stride)
    # assert: the same elements, copied
    assert torch.equal(got, want)


@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_unfold_and_grouped_per_sample_gradients_agree(name: str, views: int) -> None:
    # arrange
    conv = CONVS[name]
    a = torch.randn(2 * views, conv.in_channels, 9, 11)
    with torch.no_grad():
        g = torch.randn_like(conv(a))
    # act
    unfolded = norm_samplers.conv2d_weight_grad_sample_unfold(conv, a, g, views=views)
    grouped = norm_samplers.conv2d_weight_grad_sample(conv, a, g, views=views)
    # assert: both are the per-example sums of ordinary weight gradients
    want = torch.stack([
        torch.nn.grad.conv2d_weight(a[i * views:(i + 1) * views], conv.weight.shape, g[i * views:(i + 1) * views],
                                    stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
                                    dilation=conv.dilation, groups=conv.groups)
        for i in range(2)])
    atol = 1e-6 * float(want.abs().max())  # sums of ~300 products of unit normals: rounding ~1e-6 relative
    torch.testing.assert_close(unfolded, want, rtol=RTOL, atol=atol)
    torch.testing.assert_close(grouped, want, rtol=RTOL, atol=atol)


def test_prefer_unfold_is_a_shape_rule() -> None:
    assert norm_samplers.prefer_unfold(nn.Conv2d(1, 32, 3))
    assert norm_samplers.prefer_unfold(nn.Conv2d(8, 8, 3, groups=2))  # 4 input channels per group
    assert not norm_samplers.prefer_unfold(nn.Conv2d(32, 32, 3))


class _TwoConvs(nn.Module):
    """A stem (unfold path) and a wide convolution (grouped path), GroupNorm, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False)
        self.norm = nn.GroupNorm(2, 8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(torch.relu(self.norm(self.stem(x))))).flatten(1))


CLIP = 4.2  # between the smallest and the largest per-sample norm of the batch below


@pytest.mark.parametrize("mode", MODES)
def test_model_with_both_conv_paths_equals_ew_and_clips_each_sample(mode: str) -> None:
    # arrange
    torch.manual_seed(0)
    model = _TwoConvs()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 10, 10, generator=g), torch.randint(0, 3, (6,), generator=g)
    ref = copy.deepcopy(model)
    gsm = prepare_module(ref, grad_sample_mode="ew", wrap_model=True, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(ref.parameters(), lr=0.0), noise_multiplier=0.9, max_grad_norm=CLIP,
                      expected_batch_size=5.0, generator=torch.Generator().manual_seed(7))
    dp = make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.9, max_grad_norm=CLIP,
                      expected_batch_size=5.0, generator=torch.Generator().manual_seed(7), mode=mode)  # type: ignore[arg-type]
    # act
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(gsm(x), y).backward()
    per_sample = torch.cat([p.grad_sample.reshape(6, -1) for p in opt.params], dim=1)
    opt.step()
    norms = dp.per_sample_norms(x, y)
    dp.step(x, y)
    clipped = [p.summed_grad.clone() for p in model.parameters()]  # type: ignore[attr-defined]
    dp.close()
    # assert: same norms, clipped sums and noisy gradients as ew
    assert float(norms.max()) > CLIP and float(norms.min()) < CLIP
    torch.testing.assert_close(norms, per_sample.norm(dim=1), rtol=RTOL, atol=ATOL)
    for c, p, r in zip(clipped, model.parameters(), ref.parameters()):
        torch.testing.assert_close(c, r.summed_grad, rtol=RTOL, atol=ATOL)  # type: ignore[attr-defined]
        torch.testing.assert_close(p.grad, r.grad, rtol=RTOL, atol=ATOL)
    # and every clipped per-sample gradient (ew's, with the engine's coefficients) is within the bound
    coef = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    assert bool(((per_sample.norm(dim=1) * coef) <= CLIP * (1 + 1e-5)).all())


def test_group_norm_statistics_are_captured_in_the_forward_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # arrange: recomputing the statistics would call torch.var_mean
    torch.manual_seed(0)
    model = _TwoConvs()
    x, y = torch.randn(4, 1, 10, 10), torch.tensor([0, 1, 2, 0])
    want = copy.deepcopy(model)
    dp_want = make_dp_step(want, torch.optim.SGD(want.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=0.3,
                           expected_batch_size=4.0, generator=torch.Generator())
    dp_want.step(x, y)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("GroupNorm statistics recomputed")

    dp = make_dp_step(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=0.3,
                      expected_batch_size=4.0, generator=torch.Generator())
    # act
    monkeypatch.setattr(torch, "var_mean", refuse)
    dp.step(x, y)
    monkeypatch.undo()
    # assert: the step ran without recomputing, and gives the same clipped sum as an unpatched run
    for p, q in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("noise", "secure"), [(1.3, False), (0.0, False), (1.3, True)])
def test_lean_noise_optimizer_is_bitwise_opacus(noise: float, secure: bool) -> None:
    # arrange: the same clipped sums in p.grad, the same generator seed
    shapes = [(5, 3), (7,), (2, 3, 3, 3)]
    sums = [torch.randn(s) for s in shapes]
    ps_ref = [nn.Parameter(torch.zeros(s)) for s in shapes]
    ps_new = [nn.Parameter(torch.zeros(s)) for s in shapes]
    ref = DPOptimizerFastGradientClipping(torch.optim.SGD(ps_ref, lr=0.1), noise_multiplier=noise, max_grad_norm=0.8,
                                          expected_batch_size=6.0, loss_reduction="mean",
                                          generator=torch.Generator().manual_seed(5), secure_mode=secure)
    new = LeanNoiseOptimizer(torch.optim.SGD(ps_new, lr=0.1), noise_multiplier=noise, max_grad_norm=0.8,
                             expected_batch_size=6.0, loss_reduction="mean",
                             generator=torch.Generator().manual_seed(5), secure_mode=secure)
    # act: two steps each
    for _ in range(2):
        for opt, ps in ((ref, ps_ref), (new, ps_new)):
            opt.zero_grad(set_to_none=True)
            for p, s in zip(ps, sums):
                p.grad = s.clone()
            opt.step()
    # assert: bitwise the same noisy gradients, clipped sums and parameters
    for a, b in zip(ps_new, ps_ref):
        assert torch.equal(a.grad, b.grad)
        assert torch.equal(a.summed_grad, b.summed_grad)  # type: ignore[attr-defined]
        assert torch.equal(a, b)
