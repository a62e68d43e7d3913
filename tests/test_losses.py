"""W+ Adapter loss terms, augmentation and condition dropout on hand-made tensors."""
from __future__ import annotations

import pytest
import torch

from training.losses import (
    apply_condition_dropout,
    condition_dropout,
    dropout_from_uniform,
    identity_regulariser,
    mask_to_latent,
    masked_disentangle,
    noise_mse,
    stage2_loss,
    code_augment,
)


def test_noise_mse_value_and_shape_check():
    assert noise_mse(torch.zeros(2, 4, 3, 3), torch.full((2, 4, 3, 3), 2.0)).item() == pytest.approx(4.0)
    with pytest.raises(ValueError):
        noise_mse(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 4))


def test_masked_disentangle_mask_semantics():
    eps_w = torch.randn(2, 4, 8, 8)
    eps_aug = eps_w + 1.0  # differs by exactly 1 everywhere
    assert masked_disentangle(eps_w, eps_aug, torch.zeros(2, 1, 8, 8)).item() == 0.0
    assert masked_disentangle(eps_w, eps_aug, torch.ones(2, 1, 8, 8)).item() == pytest.approx(1.0)
    half = torch.zeros(2, 1, 8, 8)
    half[..., :, :4] = 1.0  # left half is non-face
    assert masked_disentangle(eps_w, eps_aug, half).item() == pytest.approx(0.5)
    # the face region (mask 0) is free to change
    eps_face = eps_w.clone()
    eps_face[..., 4:] += 5.0
    assert masked_disentangle(eps_w, eps_face, half).item() == 0.0
    # an image-size mask is resized to the latent grid
    img_mask = torch.zeros(2, 1, 64, 64)
    img_mask[..., :, :32] = 1.0
    assert masked_disentangle(eps_w, eps_aug, img_mask).item() == pytest.approx(0.5)


def test_mask_to_latent_formats():
    m = torch.zeros(1, 64, 64, dtype=torch.uint8)
    m[:, :8, :8] = 255  # exactly one 8x8 latent cell
    lat = mask_to_latent(m, 8)
    assert lat.shape == (1, 1, 8, 8) and lat.dtype == torch.float32
    assert lat[0, 0, 0, 0].item() == 1.0 and lat.sum().item() == 1.0
    partial = torch.zeros(1, 1, 16, 16)
    partial[..., 0, 0] = 1.0  # a quarter of the first 2x2 cell
    assert mask_to_latent(partial, (8, 8))[0, 0, 0, 0].item() == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mask_to_latent(torch.zeros(1, 3, 8, 8), 8)


def test_identity_regulariser():
    e = torch.randn(3, 4, 8, 8)
    assert identity_regulariser(e, e.clone()).item() == 0.0
    assert identity_regulariser(e, e - 3.0).item() == pytest.approx(9.0)


def test_shuffle_is_a_permutation_and_noise_has_sigma():
    w = torch.randn(16, 18, 512)
    g = torch.Generator().manual_seed(0)
    s = code_augment(w, "shuffle", generator=g)
    # every output row is an input row, each used once
    match = (s[:, None] == w[None]).flatten(2).all(-1)  # (16, 16)
    assert torch.all(match.sum(0) == 1) and torch.all(match.sum(1) == 1)
    assert not torch.equal(s, w)
    n = code_augment(w, "noise", sigma=0.3, generator=torch.Generator().manual_seed(1))
    d = n - w
    assert d.std().item() == pytest.approx(0.3, rel=0.02) and abs(d.mean().item()) < 0.01
    both0 = code_augment(w, "both", sigma=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.all((both0[:, None] == w[None]).flatten(2).all(-1).sum(1) == 1)
    both = code_augment(w, "both", sigma=0.3, generator=torch.Generator().manual_seed(2))
    assert (both - both0).std().item() == pytest.approx(0.3, rel=0.02)
    # deterministic for a given generator seed
    assert torch.equal(code_augment(w, "both", 0.3, torch.Generator().manual_seed(5)),
                       code_augment(w, "both", 0.3, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError):
        code_augment(w, "flip")


def test_code_augment_with_given_noise():
    w = torch.randn(4, 18, 512)
    noise = torch.randn(4, 18, 512)
    assert torch.equal(code_augment(w, "noise", 0.5, noise=noise), w + 0.5 * noise)
    # both: the permutation from `generator`, then row i of the given noise onto output row i
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(3))
    got = code_augment(w, "both", 0.5, generator=torch.Generator().manual_seed(3), noise=noise)
    assert torch.equal(got, w[perm] + 0.5 * noise)
    assert torch.equal(code_augment(w, "shuffle", 0.5, torch.Generator().manual_seed(3), noise=noise), w[perm])
    with pytest.raises(ValueError, match="noise shape"):
        code_augment(w, "noise", noise=noise[:2])


def test_condition_dropout_rates():
    n = 200_000
    di, dt = condition_dropout(n, 0.05, 0.05, 0.05, generator=torch.Generator().manual_seed(0))
    assert di.dtype == torch.bool and di.shape == (n,)
    tol = 0.004  # ~6 sigma at n = 200k
    assert (di & ~dt).float().mean().item() == pytest.approx(0.05, abs=tol)
    assert (dt & ~di).float().mean().item() == pytest.approx(0.05, abs=tol)
    assert (di & dt).float().mean().item() == pytest.approx(0.05, abs=tol)
    assert (~di & ~dt).float().mean().item() == pytest.approx(0.85, abs=tol)
    di, dt = condition_dropout(n, 0.2, 0.0, 0.1, generator=torch.Generator().manual_seed(1))
    assert di.float().mean().item() == pytest.approx(0.3, abs=tol)
    assert dt.float().mean().item() == pytest.approx(0.1, abs=tol)
    assert torch.equal(dt & ~di, torch.zeros_like(dt))
    di, dt = condition_dropout(1000, 0.0, 0.0, 0.0)
    assert not di.any() and not dt.any()
    with pytest.raises(ValueError):
        condition_dropout(10, 0.5, 0.4, 0.2)


def test_dropout_from_uniform_matches_condition_dropout():
    u = torch.tensor([0.0, 0.099, 0.1, 0.25, 0.3, 0.5, 0.999])
    di, dt = dropout_from_uniform(u, 0.1, 0.2, 0.3)  # image < 0.1 <= text < 0.3 <= both < 0.6
    assert di.tolist() == [True, True, False, False, True, True, False]
    assert dt.tolist() == [False, False, True, True, True, True, False]
    # condition_dropout is the same cases on its own uniform draws
    u = torch.rand(500, generator=torch.Generator().manual_seed(9))
    a = condition_dropout(500, 0.1, 0.2, 0.3, generator=torch.Generator().manual_seed(9))
    b = dropout_from_uniform(u, 0.1, 0.2, 0.3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError):
        dropout_from_uniform(u, 0.5, 0.4, 0.2)
    with pytest.raises(ValueError):
        dropout_from_uniform(u, -0.1, 0.0, 0.0)


def test_apply_condition_dropout():
    w = torch.randn(3, 18, 512)
    text = torch.randn(3, 77, 32)
    null = torch.randn(1, 77, 32)
    drop_i = torch.tensor([True, False, False])
    drop_t = torch.tensor([False, True, False])
    w2, t2 = apply_condition_dropout(w, text, null, drop_i, drop_t)
    assert torch.all(w2[0] == 0) and torch.equal(w2[1:], w[1:])
    assert torch.equal(t2[1], null[0]) and torch.equal(t2[0], text[0]) and torch.equal(t2[2], text[2])


def test_stage2_loss_terms_and_gradients():
    noise = torch.randn(2, 4, 8, 8)
    eps_w = (noise + 0.5).requires_grad_(True)
    eps_aug = (noise + 1.5).requires_grad_(True)
    eps_base = (noise - 0.5).requires_grad_(True)
    mask = torch.ones(2, 1, 8, 8)
    out = stage2_loss(eps_w, noise, eps_aug, eps_base, mask, l_dis=1.5, l_reg=1.0)
    assert out["rec"].item() == pytest.approx(0.25)
    assert out["dis"].item() == pytest.approx(1.0)
    assert out["reg"].item() == pytest.approx(1.0)
    assert out["loss"].item() == pytest.approx(0.25 + 1.5 * 1.0 + 1.0 * 1.0)
    out["loss"].backward()
    assert eps_w.grad is not None and eps_aug.grad is None and eps_base.grad is None
    # without detaching, the augmented branch receives gradient as well
    eps_aug.grad = None
    stage2_loss(eps_w, noise, eps_aug, eps_base, mask, detach_targets=False)["loss"].backward()
    assert eps_aug.grad is not None
