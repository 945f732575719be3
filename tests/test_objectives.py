"""Loss, EMA, LR/tau schedules and LARS against the formulas of the BYOL paper."""

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


# Known values, worked out by hand: peak 0.8, 10 warmup steps of 100. Warmup is linear
# (step 5: half the peak); the decay is half a cosine over the remaining 90 steps, so a third
# of the way (step 40) it is 0.8 * (1 + cos 60deg) / 2 = 0.6, halfway (step 55) 0.4, two thirds
# (step 70) 0.2, and 0 at the end.
@pytest.mark.parametrize(
    "step,lr",
    [(0, 0.0), (5, 0.4), (10, 0.8), (40, 0.6), (55, 0.4), (70, 0.2), (100, 0.0), (120, 0.0)],
)
def test_learning_rate_at_known_steps(step, lr):
    assert optim.learning_rate_at(step, 100, 10, 0.8) == pytest.approx(lr, abs=1e-12)


# tau_base 0.99 over 300 steps: tau = 1 - 0.01 * (cos(pi k / 300) + 1) / 2, so 0.99 at the
# start, 0.9925 at k = 100 (cos 60deg = 1/2), 0.995 halfway, 0.9975 at k = 200, 1 at the end.
@pytest.mark.parametrize(
    "step,tau", [(0, 0.99), (100, 0.9925), (150, 0.995), (200, 0.9975), (300, 1.0), (400, 1.0)]
)
def test_tau_at_known_steps(step, tau):
    assert optim.ema_tau_at(step, 300, 0.99) == pytest.approx(tau, abs=1e-12)


def test_no_warmup_starts_at_the_peak():
    assert optim.learning_rate_at(0, 50, 0, 0.8) == pytest.approx(0.8)


def test_ema_update_moves_target_towards_online():
    online = [torch.randn(3, 3), torch.randn(4)]
    target = [torch.randn(3, 3), torch.randn(4)]
    expected = [0.9 * t + 0.1 * o for t, o in zip(target, online)]
    byol.ema_update_(target, online, tau=0.9)
    for t, e in zip(target, expected):
        torch.testing.assert_close(t, e)


def test_target_starts_as_copy_and_follows_only_by_ema():
    backbone, dim = build_backbone("resnet18", True, 32)
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
    backbone, dim = build_backbone("resnet50", False, 224)
    net = byol.BYOLNetwork(backbone, dim, 64, 16)
    adapted, excluded = optim.parameter_groups(net, 1.5e-6)
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


def lars_and_parameters(seed):
    torch.manual_seed(seed)
    w, b = nn.Parameter(torch.randn(8, 5)), nn.Parameter(torch.randn(5))
    opt = optim.LARS(
        [
            {"params": [w], "weight_decay": 0.01, "lars_exclude": False},
            {"params": [b], "weight_decay": 0.0, "lars_exclude": True},
        ],
        lr=0.3,
        momentum=0.9,
    )
    return opt, [w, b]


def test_a_lars_step_applied_on_the_device_flag_is_the_plain_step_and_a_skipped_one_is_nothing():
    """apply_only_if(True) gives the unconditional step's bits (so old checkpoints resume to
    the same weights); apply_only_if(False), with the zeroed gradients the non-finite guard
    leaves, changes neither weights nor momentum."""
    plain, plain_params = lars_and_parameters(0)
    flagged, flagged_params = lars_and_parameters(0)
    grads = [[torch.randn(8, 5), torch.randn(5)] for _ in range(3)]
    for step_grads in grads:
        for p, q, g in zip(plain_params, flagged_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        plain.step()
        flagged.apply_only_if(torch.tensor(True))
        flagged.step()
        for p, q in zip(plain_params, flagged_params):
            assert torch.equal(p, q)
            assert torch.equal(
                plain.state[p]["momentum_buffer"], flagged.state[q]["momentum_buffer"]
            )
    before = [p.detach().clone() for p in flagged_params]
    momentum = [flagged.state[p]["momentum_buffer"].clone() for p in flagged_params]
    for p in flagged_params:
        p.grad = torch.zeros_like(p)
    flagged.apply_only_if(torch.tensor(False))
    flagged.step()
    for p, b, m in zip(flagged_params, before, momentum):
        assert torch.equal(p, b) and torch.equal(flagged.state[p]["momentum_buffer"], m)


def test_an_ema_step_applied_on_the_device_flag_is_the_plain_step_and_a_skipped_one_is_nothing():
    channels_last = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    online = [torch.randn(3, 3), torch.randn(4), channels_last]
    target = [torch.randn_like(o) for o in online]
    plain = [t.clone() for t in target]
    byol.ema_update_(plain, online, tau=0.99)
    flagged = [t.clone() for t in target]
    byol.ema_update_(flagged, online, tau=0.99, apply=torch.tensor(True))
    assert all(torch.equal(p, f) for p, f in zip(plain, flagged))
    skipped = [t.clone() for t in target]
    byol.ema_update_(skipped, online, tau=0.99, apply=torch.tensor(False))
    assert all(torch.equal(s, t) for s, t in zip(skipped, target))
