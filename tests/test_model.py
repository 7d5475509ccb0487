"""The attentive VAE: distributions, depth-wise attention, gradients, bounds, real-data fit."""

from __future__ import annotations

import math

import pytest
import torch

from avi_scale.config import AttentionConfig, ModelConfig, load_config
from avi_scale.model import AttentiveVAE, count_parameters
from avi_scale.model.attention import DepthwiseAttention
from avi_scale.model.distributions import Bernoulli, DiagGaussian, DiscretizedLogisticMixture, bound
from avi_scale.model.layers import NonLocalBlock

from helpers import REPO


def tiny_cfg(attention: bool = True, likelihood: str = "bernoulli", **kw) -> ModelConfig:
    rgb = likelihood == "logistic_mixture"
    base = dict(
        image_channels=3 if rgb else 1, image_size=32 if rgb else 28, padded_size=32, likelihood=likelihood,
        num_layers=4, num_filters=8, latent_channels=4, num_blocks=1, num_preprocess_blocks=1,
        num_postprocess_blocks=1,
        prior_attention=AttentionConfig(attention, 4, True), posterior_attention=AttentionConfig(attention, 4, True),
        nonlocal_places=["preprocess", "encoder", "decoder", "merge", "postprocess"], nonlocal_key_dim=4,
    )
    base.update(kw)
    return ModelConfig(**base)


def binary_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 28, 28, generator=g) > 0.6).float()


def set_gains(model, value):
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.data.fill_(value)


# -- published sizes -------------------------------------------------------------------------
@pytest.mark.parametrize("name,published", [
    ("cifar10_attentive", 118.97e6), ("cifar10_nvae16", 79.21e6), ("omniglot_attentive", 7.87e6)])
def test_paper_configs_have_published_sizes(name, published):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        n = count_parameters(AttentiveVAE(cfg.model))
    assert abs(n - published) / published < 0.02, (name, n)


def test_all_configs_build():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        with torch.device("meta"):
            assert count_parameters(AttentiveVAE(cfg.model)) > 0


# -- likelihoods and KL ----------------------------------------------------------------------
def test_logistic_mixture_sums_to_one_grayscale():
    torch.manual_seed(0)
    params = torch.randn(1, DiscretizedLogisticMixture.num_params(1, 5), 1, 1) * 2
    values = torch.arange(256).float().view(256, 1, 1, 1) / 255 * 2 - 1
    d = DiscretizedLogisticMixture(params.expand(256, -1, -1, -1), 1, 5)
    total = d.log_prob(values).exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-4)


def test_logistic_mixture_rgb_sums_to_one_over_all_colours():
    torch.manual_seed(1)
    m = 2
    params = torch.randn(1, DiscretizedLogisticMixture.num_params(3, m), 1, 1)
    params[:, m:] = params[:, m:] * 0.5  # moderate scales so every level carries mass
    levels = torch.arange(256).float() / 255 * 2 - 1
    total = 0.0
    for r in levels:  # sum over 256^3 colours, one red level at a time
        g, b = torch.meshgrid(levels, levels, indexing="ij")
        x = torch.stack([torch.full_like(g, r.item()), g, b], dim=-1).view(-1, 3, 1, 1)
        d = DiscretizedLogisticMixture(params.expand(x.shape[0], -1, -1, -1), 3, m)
        total += d.log_prob(x).double().exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-3)


def test_bernoulli_sums_to_one():
    logits = torch.randn(1, 1, 1, 1) * 3
    p0 = Bernoulli(logits).log_prob(torch.zeros(1, 1, 1, 1)).exp()
    p1 = Bernoulli(logits).log_prob(torch.ones(1, 1, 1, 1)).exp()
    assert (p0 + p1).item() == pytest.approx(1.0, abs=1e-6)


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(0)
    shape = (2, 3, 4, 4)
    q = DiagGaussian.from_raw(torch.randn(shape), torch.randn(shape) * 0.5, (-5, 5))
    p = DiagGaussian.from_raw(torch.randn(shape), torch.randn(shape) * 0.5, (-1, 5))
    s = 20000
    rep = lambda d: DiagGaussian(d.raw_mu, d.raw_log_sigma, d.mu.repeat(s, 1, 1, 1), d.sigma.repeat(s, 1, 1, 1))
    qs, ps = rep(q), rep(p)
    z = qs.sample()  # [S * B, ...]
    mc = (qs.log_prob(z) - ps.log_prob(z)).view(s, 2).mean(0)
    assert torch.allclose(mc, q.kl(p), rtol=0.03, atol=0.3)


def test_bounds_match_official_parameterisation():
    x = torch.linspace(-50, 50, 1001)
    assert bound(x, -5, 5).abs().max() <= 5
    assert torch.allclose(bound(torch.zeros(1), -5, 5), torch.zeros(1))
    asym = bound(x, -1, 5)  # smoothstep between asymmetric bounds
    assert asym.min() == pytest.approx(-1) and asym.max() == pytest.approx(5)
    assert torch.all(asym[1:] >= asym[:-1])


# -- depth-wise attention --------------------------------------------------------------------
def test_depthwise_attention_weights_sum_to_one_and_are_per_pixel():
    torch.manual_seed(0)
    att = DepthwiseAttention()
    q, k, v = torch.randn(2, 5, 6, 6), torch.randn(2, 3, 5, 6, 6), torch.randn(2, 3, 7, 6, 6)
    out, w = att(q, k, v, return_weights=True)
    assert w.shape == (2, 3, 6, 6) and out.shape == (2, 7, 6, 6)
    assert torch.allclose(w.sum(1), torch.ones(2, 6, 6), atol=1e-6)
    k2, v2 = k.clone(), v.clone()
    k2[..., 4, 5] += 10.0  # change another pixel's keys and values
    v2[..., 4, 5] -= 10.0
    out2 = att(q, k2, v2)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[4, 5] = False
    assert torch.equal(out[..., mask], out2[..., mask])
    assert not torch.equal(out[..., 4, 5], out2[..., 4, 5])


@pytest.mark.parametrize("channels,key_dim", [(6, 4), (4, 6), (5, 5)])
def test_non_local_block_padding_for_fused_kernels_changes_nothing(channels, key_dim, monkeypatch):
    """Padding q/k/v to one width (so SDPA's fused kernels apply) gives the unpadded block's output and
    gradients, and the unpadded one equals the textbook softmax(scale q.k) v."""
    torch.manual_seed(0)
    block = NonLocalBlock(channels, key_dim)
    with torch.no_grad():
        block.gamma.fill_(0.7)
        block.scale.fill_(0.3)
    x = torch.randn(3, channels, 5, 4)

    def run(pad: bool):
        monkeypatch.setattr(NonLocalBlock, "pad_for_fused_kernels", pad)
        block.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), xi.grad, [p.grad.clone() for p in block.parameters()]

    (a, ga, pa), (b, gb, pb) = run(True), run(False)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ga, gb, atol=1e-5)
    assert all(torch.allclose(u, v, atol=1e-4) for u, v in zip(pa, pb))
    q = (block.query(x) * block.scale).flatten(2).transpose(1, 2)
    k = block.key(x).flatten(2)
    v = block.value(x).flatten(2).transpose(1, 2)
    ref = x + block.gamma * (torch.softmax(q @ k, -1) @ v).transpose(1, 2).reshape_as(x)
    assert torch.allclose(a, ref.detach(), atol=1e-5)


def test_zero_gains_make_attention_add_nothing():
    torch.manual_seed(0)
    model = AttentiveVAE(tiny_cfg()).eval()
    x = binary_batch()
    feats = model._bottom_up(x)
    memory = []
    z = torch.randn(x.shape[0], 4, 16, 16)
    for i, layer in enumerate(model.layers):
        if i >= 2:
            memory[i - 2] = model.memory_norms[i - 2](memory[i - 2])
        stored, prior_cond, query = layer.decode(x.shape[0], z if i else None, memory)
        ctx = stored[:, :model.w.ctx]
        assert torch.equal(prior_cond[:, :model.w.ctx], ctx)  # prior condition = un-attended context
        memory.append(stored)
    # the posterior likewise: with gains at zero, perturbing the attention changes nothing
    torch.manual_seed(1)
    ref = model(x).neg_elbo
    for layer in model.layers:
        layer.posterior_attention.scale.data.fill_(7.0)
        if layer.prior_att:
            layer.prior_attention.scale.data.fill_(-3.0)
    torch.manual_seed(1)
    assert torch.allclose(model(x).neg_elbo, ref)
    set_gains(model, 0.5)
    torch.manual_seed(1)
    assert not torch.allclose(model(x).neg_elbo, ref)


def test_posterior_attends_over_current_and_lower_layers_prior_over_upper():
    model = AttentiveVAE(tiny_cfg()).eval()
    w = model.attention_weights(binary_batch(2))
    L = model.cfg.num_layers
    for i in range(L):  # posterior of layer i: e_i..e_{L-1} plus the preprocessed feature
        assert w["posterior"][i].shape[1] == L - i + 1
    for i in range(1, L):  # prior of layer i: layers 0..i-1, not itself
        assert w["prior"][i].shape[1] == i
    assert 0 not in w["prior"]


def test_local_baseline_has_no_attention_parameters():
    local = AttentiveVAE(tiny_cfg(attention=False, nonlocal_places=[]))
    names = [n for n, _ in local.named_parameters()]
    assert not any("attention" in n or "nonlocal" in n or "gamma" in n for n in names)
    assert count_parameters(local) < count_parameters(AttentiveVAE(tiny_cfg()))


# -- gradients, outputs ----------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic_mixture"])
def test_every_parameter_receives_a_gradient(likelihood):
    torch.manual_seed(0)
    model = AttentiveVAE(tiny_cfg(likelihood=likelihood))
    set_gains(model, 0.3)  # away from the zero init so the attention branches carry gradient
    x = binary_batch() if likelihood == "bernoulli" else torch.randint(0, 256, (4, 3, 32, 32)).float() / 255
    out = model(x, beta=0.7)
    assert out.kl.shape == (x.shape[0], 4) and out.neg_elbo.shape == (x.shape[0],)
    out.loss.backward()
    # layer 1's prior attends over a single entry (layer 0): softmax over one entry is 1 whatever
    # the score, so its score scale is the one parameter whose gradient is zero by construction
    single_entry = {"layers.1.prior_attention.scale"}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert (p.grad.abs().sum() > 0) != (name in single_entry), name


def test_loss_weights_kl_by_beta():
    torch.manual_seed(0)
    model = AttentiveVAE(tiny_cfg()).eval()
    x = binary_batch()
    torch.manual_seed(3)
    out = model(x, beta=0.25)
    expected = (out.recon_nll + 0.25 * out.kl.sum(1)).mean()
    assert torch.allclose(out.loss, expected)
    assert torch.allclose(out.neg_elbo, out.recon_nll + out.kl.sum(1))
    assert model.bits_per_dim(torch.tensor(784 * math.log(2))).item() == pytest.approx(1.0)


def test_activation_checkpointing_gives_identical_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = AttentiveVAE(tiny_cfg(activation_checkpointing=ckpt))
        set_gains(model, 0.2)
        torch.manual_seed(1)
        model(binary_batch()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6), n


@pytest.mark.parametrize("ckpt", [False, True])
def test_layer_stats_on_request_change_nothing_else(ckpt):
    """``stats=True`` returns each layer's prior, posterior, sample and attention as computed in the pass:
    the loss, the outputs and (under activation checkpointing too) the gradients stay those of a plain call."""
    torch.manual_seed(0)
    model = AttentiveVAE(tiny_cfg(activation_checkpointing=ckpt))
    set_gains(model, 0.2)
    x = binary_batch(3)
    runs = []
    for stats in (False, True):
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x, stats=stats)
        out.loss.backward()
        runs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, g_plain), (full, g_full) = runs
    assert plain.stats is None and len(plain) == len(full)
    for name in ("loss", "neg_elbo", "recon_nll", "kl"):
        assert torch.equal(getattr(plain, name), getattr(full, name)), name
    assert all(torch.equal(g_plain[n], g_full[n]) for n in g_plain)
    L, hw = model.cfg.num_layers, model.latent_hw
    assert len(full.stats) == L
    kl = torch.stack([s.posterior.kl(s.prior) for s in full.stats], dim=1)
    assert torch.allclose(kl, full.kl, rtol=1e-5, atol=1e-5)
    assert torch.equal(full.stats[0].prior.mu, torch.zeros(3, 4, hw, hw))
    assert torch.equal(full.stats[0].prior.sigma, torch.ones(3, 4, hw, hw))
    for i, s in enumerate(full.stats):
        assert s.z.shape == (3, 4, hw, hw) and not s.z.requires_grad and not s.posterior.mu.requires_grad
        assert s.posterior_attention.shape == (3, L - i + 1, hw, hw)
        assert (s.prior_attention is None) == (i == 0)
    model.eval()
    torch.manual_seed(2)
    weights = model.attention_weights(x)
    torch.manual_seed(2)
    with torch.no_grad():
        again = model(x, stats=True).stats
    for i in range(L):
        assert torch.equal(weights["posterior"][i], again[i].posterior_attention)
        if i:
            assert torch.equal(weights["prior"][i], again[i].prior_attention)
    local = AttentiveVAE(tiny_cfg(attention=False, nonlocal_places=[])).eval()
    assert all(s.prior_attention is None and s.posterior_attention is None for s in local(x, stats=True).stats)


def test_importance_weighted_bound_is_tighter_than_elbo():
    torch.manual_seed(0)
    model = AttentiveVAE(tiny_cfg(nonlocal_places=["decoder"])).eval()
    set_gains(model, 0.2)
    x = binary_batch(4)
    torch.manual_seed(1)
    elbo = torch.stack([-model(x).neg_elbo for _ in range(16)]).mean(0)
    iw = model.log_likelihood(x, num_samples=48, chunk=16)
    assert iw.shape == (4,)
    assert iw.mean() >= elbo.mean()
    iw1 = torch.stack([model.log_likelihood(x, num_samples=1) for _ in range(16)]).mean(0)
    assert torch.allclose(iw1.mean(), elbo.mean(), rtol=0.02)  # K=1 is the ELBO estimate


@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic_mixture"])
def test_samples_at_several_temperatures_are_finite_and_in_range(likelihood):
    model = AttentiveVAE(tiny_cfg(likelihood=likelihood)).eval()
    for t in (1.0, 0.8, 0.5, 0.0):
        s = model.sample(5, temperature=t)
        c = 3 if likelihood == "logistic_mixture" else 1
        assert s.shape == (5, c, model.cfg.image_size, model.cfg.image_size)
        assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1
    r = model.reconstruct(model.sample(3))
    assert r.shape == (3, c, model.cfg.image_size, model.cfg.image_size)


def test_wrong_input_shape_is_a_clear_error():
    model = AttentiveVAE(tiny_cfg())
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, 28, 28\]"):
        model(torch.zeros(2, 1, 32, 32))


def test_negative_elbo_falls_on_real_digits():
    from data_tools.mnist5k import load_mnist5k

    images, _ = load_mnist5k()
    torch.manual_seed(0)
    x = (torch.from_numpy(images[:32]).float().unsqueeze(1) / 255 > 0.5).float()
    cfg = load_config(REPO / "configs" / "tiny_mnist5k.yaml").model
    model = AttentiveVAE(cfg)
    opt = torch.optim.Adamax(model.parameters(), lr=5e-3, eps=1e-3)
    losses = []
    for _ in range(40):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.neg_elbo.mean().item())
    assert losses[-1] < 0.3 * losses[0], losses[::5]
    assert losses[-1] < 250, losses[::5]  # nats per image on 784 binary pixels
