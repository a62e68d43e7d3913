"""Loss terms and condition dropout shared by the methods' objectives; pure functions.
(The W+ Adapter's: Li et al. 2023, eq. 4-8.)

Shapes: noise predictions / targets are (B, C, h, w) latents (C = 4); masks are (B, 1, H, W)
floats in [0, 1] with 1 = NON-face (the region the disentanglement loss protects), given at image
or latent size (`mask_to_latent` resizes). Every loss is a mean over all elements, in float32.

Stage I:  L = noise_mse(eps(z_t, t, text, w), eps)
Stage II: L = L_rec + l_dis * L_dis + l_reg * L_reg   (`stage2_loss`; paper l_dis 1.5, l_reg 1.0)
          L_dis = mean(((eps(w) - eps(aug(w))) * M)^2),  L_reg = mean((eps(w) - eps(lambda=0))^2)
The authors' code computes eps(aug(w)) and eps(lambda=0) without gradient; `stage2_loss` detaches
them by default (`detach_targets=True`), so they may be computed under `torch.no_grad()`.

Identity Encoder (Su et al. 2023): `soft_nearest_neighbour_loss` (Eq. 4), `dirichlet_weights` (the
random convex combination of Eq. 3), `linear_schedule` (the identity-drop curriculum).
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F


def noise_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((pred - target)^2) over all elements; (B, C, h, w) each -> scalar."""
    if pred.shape != target.shape:
        raise ValueError(f"noise_mse: shapes differ {tuple(pred.shape)} vs {tuple(target.shape)}")
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def mask_to_latent(mask: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) mask (float [0, 1], bool, or uint8 0..255) -> (B, 1, h, w) float.

    Downsampling averages pixels (area), so a latent cell holds the non-face fraction it covers;
    upsampling is bilinear.
    """
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W) or (B, H, W), got {tuple(mask.shape)}")
    if mask.dtype == torch.uint8:
        mask = mask.float() / 255.0
    mask = mask.float()
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(mask.shape[-2:]) == size:
        return mask
    if mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1]:
        return F.interpolate(mask, size=size, mode="area")
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


def masked_disentangle(eps_w: torch.Tensor, eps_aug: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean(((eps_w - eps_aug) * M)^2); eps (B, C, h, w), M (B, 1, h, w) (resized if at image size)."""
    if eps_w.shape != eps_aug.shape:
        raise ValueError(f"masked_disentangle: shapes differ {tuple(eps_w.shape)} vs {tuple(eps_aug.shape)}")
    m = mask_to_latent(mask, tuple(eps_w.shape[-2:])).to(eps_w.device)
    return (((eps_w.float() - eps_aug.float()) * m) ** 2).mean()


def identity_regulariser(eps_w: torch.Tensor, eps_base: torch.Tensor) -> torch.Tensor:
    """mean((eps_w - eps_base)^2): eps with W+ vs the same UNet at lambda = 0; (B, C, h, w) -> scalar."""
    return noise_mse(eps_w, eps_base)


def code_augment(
    w: torch.Tensor,
    mode: Literal["shuffle", "noise", "both"] = "both",
    sigma: float = 1.0,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Augment per-sample codes (B, ...) (e.g. W+ codes (B, 18, 512)) for a disentanglement loss.

    shuffle: rows of the batch permuted (a random permutation; B = 1 stays unchanged);
    noise:   w + sigma * N(0, 1) (sigma in W+ units); both: shuffle, then noise.
    `generator` must live on w's device (or be None). `noise`: the standard-normal draw (B, 18, 512)
    to use instead of drawing it from `generator` (e.g. drawn per sample); row i is added to output
    row i (after the shuffle).
    """
    if mode not in ("shuffle", "noise", "both"):
        raise ValueError(f"code_augment mode must be shuffle | noise | both, got {mode!r}")
    if noise is not None and noise.shape != w.shape:
        raise ValueError(f"code_augment: noise shape {tuple(noise.shape)} != w shape {tuple(w.shape)}")
    out = w
    if mode in ("shuffle", "both"):
        perm = torch.randperm(w.shape[0], generator=generator, device=w.device)
        out = out[perm]
    if mode in ("noise", "both"):
        if noise is None:
            noise = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
        out = out + sigma * noise.to(w.device, w.dtype)
    return out


def _check_dropout_probs(p_image: float, p_text: float, p_both: float) -> None:
    for p in (p_image, p_text, p_both):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probabilities must be in [0, 1], got {(p_image, p_text, p_both)}")
    if p_image + p_text + p_both > 1.0 + 1e-9:
        raise ValueError(f"p_image + p_text + p_both must be <= 1, got {p_image + p_text + p_both}")


def dropout_from_uniform(
    u: torch.Tensor, p_image: float = 0.05, p_text: float = 0.05, p_both: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_image, drop_text) bool masks (B,) from one uniform u in [0, 1) per sample (B,); the
    cases of `condition_dropout` (u < p_image: image only; < p_image + p_text: text only; < sum: both)."""
    _check_dropout_probs(p_image, p_text, p_both)
    a, b, c = p_image, p_image + p_text, p_image + p_text + p_both
    image_only, text_only, both = u < a, (u >= a) & (u < b), (u >= b) & (u < c)
    return image_only | both, text_only | both


def condition_dropout(
    batch_size: int,
    p_image: float = 0.05,
    p_text: float = 0.05,
    p_both: float = 0.05,
    generator: Optional[torch.Generator] = None,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (drop_image, drop_text) bool masks, each (B,).

    One uniform draw u per sample picks exactly one case (as in IP-Adapter / the W+ Adapter code):
    u < p_image -> image only; < p_image + p_text -> text only; < sum -> both; else neither. So
    P(drop_image) = p_image + p_both, P(drop_text) = p_text + p_both, P(both) = p_both.
    Dropping the image = zero W+ code (-> WProj gives its null tokens); dropping the text = "" prompt
    (`apply_condition_dropout`). With per-sample uniforms already drawn: `dropout_from_uniform`.
    """
    _check_dropout_probs(p_image, p_text, p_both)
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch_size, generator=generator, device=gen_dev)
    drop_image, drop_text = dropout_from_uniform(u, p_image, p_text, p_both)
    if device is not None:
        drop_image, drop_text = drop_image.to(device), drop_text.to(device)
    return drop_image, drop_text


def apply_condition_dropout(
    w: torch.Tensor,
    text_emb: torch.Tensor,
    null_text_emb: torch.Tensor,
    drop_image: torch.Tensor,
    drop_text: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the W+ codes (B, 18, 512) where drop_image; replace (B, 77, D) text embeddings by the
    empty-prompt embedding (1 or B, 77, D) where drop_text. Returns new tensors."""
    keep_w = (~drop_image).to(w.dtype).view(-1, *([1] * (w.ndim - 1)))
    sel = drop_text.view(-1, *([1] * (text_emb.ndim - 1)))
    return w * keep_w, torch.where(sel, null_text_emb.to(text_emb.dtype).expand_as(text_emb), text_emb)


def stage2_loss(
    eps_w: torch.Tensor,
    noise: torch.Tensor,
    eps_aug: torch.Tensor,
    eps_base: torch.Tensor,
    mask: torch.Tensor,
    l_dis: float = 1.5,
    l_reg: float = 1.0,
    detach_targets: bool = True,
) -> dict[str, torch.Tensor]:
    """Stage II objective. eps_w: eps(z_t, t, caption, w); noise: the added noise; eps_aug:
    eps(..., aug(w)); eps_base: eps at lambda = 0; mask: (B, 1, H|h, W|w), 1 = non-face.

    Returns {"rec", "dis", "reg", "loss"} with loss = rec + l_dis * dis + l_reg * reg.
    """
    if detach_targets:
        eps_aug, eps_base = eps_aug.detach(), eps_base.detach()
    rec = noise_mse(eps_w, noise)
    dis = masked_disentangle(eps_w, eps_aug, mask)
    reg = identity_regulariser(eps_w, eps_base)
    return {"rec": rec, "dis": dis, "reg": reg, "loss": rec + l_dis * dis + l_reg * reg}


# ============================================================================================
# Identity Encoder (Su et al. 2023): the soft nearest-neighbour identity loss and convex weights


def soft_nearest_neighbour_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                                normalize: bool = True) -> torch.Tensor:
    """Soft nearest-neighbour loss (Frosst et al. 2019; Identity Encoder Eq. 4) of K points z (K, D)
    with labels (K,):

        L = -1/K' sum_k log( sum_{j != k, s_j = s_k} exp(-|z_k - z_j|^2 / T) / sum_{j != k} exp(-|z_k - z_j|^2 / T) )

    over the K' points that have another point of their label (a point without one has no
    neighbour to be near: it only serves as a negative). `normalize`: z is L2-normalised first
    (then |z_k - z_j|^2 is in [0, 4]). Computed in float32 with log-sum-exp. A scalar; 0 (with the
    graph) when no point has a same-label partner."""
    if z.ndim != 2 or labels.shape != z.shape[:1]:
        raise ValueError(f"soft_nearest_neighbour_loss: z (K, D) and labels (K,), got {tuple(z.shape)}, {tuple(labels.shape)}")
    x = F.normalize(z.float(), dim=1) if normalize else z.float()
    d = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)  # (K, K) squared distances
    logits = -d / torch.as_tensor(temperature, dtype=torch.float32, device=x.device)
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    lab = labels.to(x.device)
    same = (lab[:, None] == lab[None, :]) & ~eye
    anchors = same.any(dim=1)
    if not bool(anchors.any()):
        return x.sum() * 0.0
    neg_inf = torch.finfo(logits.dtype).min
    num = torch.logsumexp(logits.masked_fill(~same, neg_inf), dim=1)
    den = torch.logsumexp(logits.masked_fill(eye, neg_inf), dim=1)
    return -(num - den)[anchors].mean()


def dirichlet_weights(n: int, alpha: float, seed: int) -> np.ndarray:
    """n convex weights ~ Dirichlet(alpha, ..., alpha) (non-negative, sum 1; alpha = 1: uniform on the
    simplex) from numpy's generator seeded by `seed` (float64 draws, returned as float32 after
    renormalising)."""
    if n < 1 or alpha <= 0:
        raise ValueError(f"dirichlet_weights: n >= 1 and alpha > 0, got n={n}, alpha={alpha}")
    w = np.random.default_rng(int(seed)).dirichlet(np.full(n, float(alpha)))
    w = np.clip(w, 0.0, None)
    return (w / w.sum()).astype(np.float32)


def linear_schedule(start: float, end: float, step: int, steps: int) -> float:
    """start at step 0, end at step `steps - 1` (and after), linear in between."""
    f = min(1.0, max(0.0, step / max(1, steps - 1)))
    return float(start + f * (end - start))


# ============================================================================================
# Face2Diffusion (Shiohara & Yamasaki 2024): the class-guided denoising target


def cgdr_target(eps: torch.Tensor, eps_class: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """Face2Diffusion's class-guided denoising target eps * M + eps_c * (1 - M) (eq. 7): the added
    noise on the face, the frozen model's class-prompt prediction elsewhere. eps / eps_class
    (B, C, h, w); face M (B, 1, h, w) in [0, 1], 1 = FACE (the opposite polarity of the W+ masks
    above); resized when given at image size."""
    if eps.shape != eps_class.shape:
        raise ValueError(f"cgdr_target: shapes differ {tuple(eps.shape)} vs {tuple(eps_class.shape)}")
    m = mask_to_latent(face, tuple(eps.shape[-2:])).to(eps.device, eps.dtype)
    return eps * m + eps_class.to(eps.dtype) * (1 - m)
