"""Loss, EMA, LR/tau schedules and LARS against the formulas of the BYOL paper."""

import math

import pytest
import torch
from torch import nn

import byol
import optim
from backbone import build_backbone


def test_regression_loss_is_two_minus_two_cosine():
    p, z = torch.randn(5, 8), torch.randn(5, 8)
    expected = 2 - 2 * nn.functional.cosine_similarity(p, z, dim=1)
    torch.testing.assert_close(byol.regression_loss(p, z), expected)
    assert torch.allclose(byol.regression_loss(z, z), torch.zeros(5), atol=1e-6)
    assert torch.allclose(byol.regression_loss(z, -z), torch.full((5,), 4.0))


def test_byol_loss_is_symmetrised_over_view_order_and_averaged():
    p1, p2, z1, z2 = (torch.randn(4, 6) for _ in range(4))
    loss = byol.byol_loss(torch.cat([p1, p2]), torch.cat([z1, z2]))
    expected = (byol.regression_loss(p1, z2) + byol.regression_loss(p2, z1)).mean()
    torch.testing.assert_close(loss, expected)


def test_loss_does_not_backpropagate_into_the_target():
    p = torch.randn(4, 6, requires_grad=True)
    z = torch.randn(4, 6, requires_grad=True)
    byol.byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


@pytest.mark.parametrize("warmup,total", [(10, 100), (0, 50)])
def test_learning_rate_warmup_then_half_cosine(warmup, total):
    peak = 0.8
    for step in range(total + 1):
        lr = optim.learning_rate_at(step, total, warmup, peak)
        if step < warmup:
            assert lr == pytest.approx(peak * step / warmup)
        else:
            progress = (step - warmup) / (total - warmup)
            assert lr == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * progress)))
    assert optim.learning_rate_at(warmup, total, warmup, peak) == pytest.approx(peak)
    assert optim.learning_rate_at(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    # The 1/2 matters: halfway through the decay the LR is half the peak, not the peak.
    mid = warmup + (total - warmup) // 2
    assert optim.learning_rate_at(mid, total, warmup, peak) == pytest.approx(peak / 2, rel=0.05)


def test_tau_schedule_rises_from_base_to_one():
    total, base = 1000, 0.996
    assert optim.ema_tau_at(0, total, base) == pytest.approx(base)
    assert optim.ema_tau_at(total, total, base) == pytest.approx(1.0)
    for k in (1, 250, 500, 999):
        assert optim.ema_tau_at(k, total, base) == pytest.approx(
            1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2
        )


def test_ema_update_moves_target_towards_online():
    online = [torch.randn(3, 3), torch.randn(4)]
    target = [torch.randn(3, 3), torch.randn(4)]
    expected = [0.9 * t + 0.1 * o for t, o in zip(target, online)]
    byol.ema_update_(target, online, tau=0.9)
    for t, e in zip(target, expected):
        torch.testing.assert_close(t, e)


def test_target_starts_as_copy_and_follows_only_by_ema():
    backbone, dim = build_backbone("resnet18", cifar_stem=True)
    net = byol.BYOLNetwork(backbone, dim, 32, 16)
    for o, t in zip(net.online_parameters(), net.target_parameters()):
        assert torch.equal(o, t) and not t.requires_grad and o.data_ptr() != t.data_ptr()
    with torch.no_grad():
        for p in net.online_parameters():
            p.add_(1.0)
    net.update_target(tau=1.0)  # tau = 1 keeps the target
    assert not torch.equal(net.online_parameters()[0], net.target_parameters()[0])
    net.update_target(tau=0.0)  # tau = 0 copies the online network
    for o, t in zip(net.online_parameters(), net.target_parameters()):
        assert torch.equal(o, t)


def test_lars_excludes_every_bias_and_norm_parameter():
    backbone, dim = build_backbone("resnet50")
    net = byol.BYOLNetwork(backbone, dim, 64, 16)
    adapted, excluded = optim.lars_param_groups(net, 1.5e-6)
    names = {id(p): n for n, p in net.named_parameters()}
    excluded_names = {names[id(p)] for p in excluded["params"]}
    adapted_names = {names[id(p)] for p in adapted["params"]}
    assert "online_backbone.layer1.0.downsample.1.weight" in excluded_names  # downsample BN
    assert "online_backbone.bn1.bias" in excluded_names
    assert "online_projector.1.weight" in excluded_names  # MLP BatchNorm
    assert "predictor.0.bias" in excluded_names
    assert all(n.endswith("weight") and "bn" not in n for n in adapted_names)
    assert "online_backbone.layer1.0.downsample.0.weight" in adapted_names  # downsample conv
    # Target parameters are not optimised at all.
    assert not any(n.startswith("target_") for n in adapted_names | excluded_names)
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]


def test_lars_step_matches_the_formula():
    w = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(3))
    g_w, g_b = torch.randn(4, 3), torch.randn(3)
    lr, wd, eta, m = 0.5, 0.01, 0.001, 0.9
    opt = optim.LARS(
        [
            {"params": [w], "weight_decay": wd, "lars_exclude": False},
            {"params": [b], "weight_decay": 0.0, "lars_exclude": True},
        ],
        lr=lr,
        momentum=m,
        trust_coefficient=eta,
    )
    w0, b0 = w.detach().clone(), b.detach().clone()
    v_w, v_b = torch.zeros_like(w0), torch.zeros_like(b0)
    for _ in range(2):
        w.grad, b.grad = g_w.clone(), g_b.clone()
        u = g_w + wd * w0
        u = u * eta * w0.norm() / u.norm()
        v_w = m * v_w + u
        v_b = m * v_b + g_b
        w0, b0 = w0 - lr * v_w, b0 - lr * v_b
        opt.step()
        torch.testing.assert_close(w.detach(), w0)
        torch.testing.assert_close(b.detach(), b0)
