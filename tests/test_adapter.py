"""Adapter building blocks: W+ parameter counts on SD 1.5 shapes, exact lambda = 0 (residual and
decoupled attention), self-describing save / load, overfitting."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors import safe_open

from pipeline.models.diffusion import build_random, build_tiny_tokenizer, load_diffusion, sd15_unet_config
from training.adapter import PersonaAdapter, load_adapter, save_adapter
from training.adapters import DecoupledAttention, ResidualAttention, TokenState, WProj, cross_attention_layers, set_scale
from training.losses import noise_mse


def wplus_adapter(unet, cross_dim: int | None = None) -> PersonaAdapter:
    """A fresh W+ adapter (WProj + residual attention) installed on `unet` (frozen before)."""
    unet.requires_grad_(False)
    cond = WProj(cross_dim=cross_dim or unet.config.cross_attention_dim, key="wplus")
    return PersonaAdapter("wplus", cond, ResidualAttention()).install(SimpleNamespace(unet=unet))

PROMPTS = ["a face", "a photo of a face", "a close-up of a face", "a depiction of a face"]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return build_random("tiny", device="cpu").freeze()


@pytest.fixture
def unet(tiny):
    """A private copy of the tiny UNet (tests install adapters on it)."""
    return copy.deepcopy(tiny.unet)


@pytest.fixture(scope="module")
def batch(tiny):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([17, 640])
    text = tiny.encode_prompt(PROMPTS[:2])
    w = torch.randn(2, 18, 512, generator=g)
    return x, t, text, w


def _params(module):
    return {id(p) for p in module.parameters()}


# ------------------------------------------------------------------------------------- (a)
def test_sd15_parameter_counts_and_only_adapter_trainable():
    # Real SD 1.5 UNet shapes on the meta device: exact shapes, no memory, no download.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(859.52e6, rel=1e-3)
    adapter = wplus_adapter(unet)
    n_w = sum(p.numel() for p in adapter.conditioner.parameters())
    n_a = sum(p.numel() for p in adapter.injection.parameters())
    assert len(adapter.injection.layers) == 16
    assert n_w == pytest.approx(7.1e6, rel=0.02)
    assert n_a == pytest.approx(31.6e6, rel=0.02)
    trainable = {id(p) for p in unet.parameters() if p.requires_grad} | {
        id(p) for p in adapter.conditioner.parameters() if p.requires_grad
    }
    assert trainable == _params(adapter)
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == n_a
    # decoupled attention: W_k', W_v' per layer (IP-Adapter style), 19.2 M on SD 1.5
    adapter.remove()
    dec = DecoupledAttention().install(unet)
    assert sum(p.numel() for p in dec.parameters()) == 19_169_280


def test_wproj_shapes_and_null_tokens():
    proj = WProj(cross_dim=32)
    w = torch.randn(3, 18, 512)
    assert proj(w).shape == (3, 4, 32)
    # each token depends only on its own group of rows
    w2 = w.clone()
    w2[:, 12:] += 1.0
    diff = (proj(w) - proj(w2)).abs().amax(dim=(0, 2))
    assert torch.all(diff[:3] == 0) and diff[3] > 0
    with pytest.raises(ValueError):
        proj(torch.randn(3, 16, 512))


# ------------------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("injection", [ResidualAttention, DecoupledAttention])
def test_scale_zero_is_bit_exact_and_scale_one_differs(unet, batch, injection):
    x, t, text, w = batch
    mask = torch.ones(2, 77, dtype=torch.bool)
    mask[:, 10:] = False  # exercise the attention-mask branch of the text path too
    with torch.no_grad():
        base = unet(x, t, text).sample
        base_masked = unet(x, t, text, encoder_attention_mask=mask).sample
    inj = injection().install(unet)
    tok = WProj(cross_dim=32)(w)
    layers = cross_attention_layers(unet)
    assert len(layers) == 7 and all(type(m.processor) is injection.processor_cls for _, m in layers)
    # the new projections start as copies of the layer's text projections
    for name, attn in layers:
        proc = attn.processor
        new_k = proc.to_k_w if injection is ResidualAttention else proc.to_k_id
        assert torch.equal(new_k.weight, attn.to_k.weight)
    with torch.no_grad():
        with inj.conditioned(tok, scale=0.0):
            out0 = unet(x, t, text).sample
            out0_masked = unet(x, t, text, encoder_attention_mask=mask).sample
        set_scale(unet, 0.0)
        out0_notokens = unet(x, t, text).sample  # no tokens needed at scale 0
        inj.scale = 1.0
        with inj.conditioned(tok):
            out1 = unet(x, t, text).sample
        out1_kwargs = unet(x, t, text, cross_attention_kwargs={"identity_tokens": tok, "identity_scale": 1.0}).sample
        out_half = unet(x, t, text, cross_attention_kwargs={"identity_tokens": tok, "identity_scale": 0.5}).sample
        # classifier-free guidance: a batch of 2B gets [uncond; cond]
        inj.set_tokens(tok[:1], uncond=tok[1:])
        cfg = unet(torch.cat([x[:1], x[:1]]), t[:1].repeat(2), torch.cat([text[:1], text[:1]])).sample
        inj.clear()
        ref = unet(torch.cat([x[:1], x[:1]]), t[:1].repeat(2), torch.cat([text[:1], text[:1]]),
                   cross_attention_kwargs={"identity_tokens": torch.cat([tok[1:], tok[:1]])}).sample
    assert torch.equal(out0, base) and torch.equal(out0_notokens, base)
    assert torch.equal(out0_masked, base_masked)
    assert (out1 - base).abs().max() > 1e-3
    assert torch.equal(out1_kwargs, out1) and torch.equal(cfg, ref)
    assert not torch.equal(out_half, out1) and not torch.equal(out_half, base)
    assert inj.scale == 1.0 and inj.tokens is None  # context restored
    with pytest.raises(RuntimeError, match="no tokens set"):
        unet(x, t, text)
    # remove restores the stock processor and the base output
    inj.remove()
    assert all(isinstance(m.processor, AttnProcessor2_0) for _, m in cross_attention_layers(unet))
    with torch.no_grad():
        assert torch.equal(unet(x, t, text).sample, base)


def test_gradients_reach_only_the_adapter(unet, batch):
    x, t, text, w = batch
    adapter = wplus_adapter(unet)
    with adapter.injection.conditioned(adapter.tokens({"wplus": w})):
        noise_mse(unet(x, t, text).sample, torch.zeros_like(x)).backward()
    adapter_ids = _params(adapter)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in unet.parameters() if id(p) not in adapter_ids)


def test_tokens_batch_broadcast_and_mismatch(unet, batch):
    x, t, text, w = batch
    adapter = wplus_adapter(unet)
    with torch.no_grad():
        tok = adapter.tokens({"wplus": w[:1]})
        with adapter.injection.conditioned(tok):
            a = unet(x, t, text).sample
        with adapter.injection.conditioned(tok.expand(2, -1, -1)):
            b = unet(x, t, text).sample
        assert torch.allclose(a, b, atol=1e-6)
        with adapter.injection.conditioned(adapter.tokens({"wplus": torch.cat([w, w[:1]])})), \
                pytest.raises(ValueError, match="batch"):
            unet(x, t, text)
    # several identities: tokens (B, K, T, D) with regions (B, K, H, W), doubled for a guided batch
    st = TokenState()
    tok, regions = torch.randn(2, 3, 4, 32), torch.rand(2, 3, 8, 8)
    st.tokens, st.uncond, st.regions = tok, torch.zeros_like(tok), regions
    assert torch.equal(st.for_batch(4), torch.cat([torch.zeros_like(tok), tok]))
    assert torch.equal(st.regions_for_batch(4), torch.cat([regions, regions])) and st.regions_for_batch(2) is regions


# ------------------------------------------------------------------------------------- (c)
def test_save_load_roundtrip_from_the_file_alone(tiny, batch, tmp_path):
    x, t, text, w = batch
    unet_a, unet_b = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.unet)
    adapter = wplus_adapter(unet_a)
    adapter.phase, adapter.base_model = "stage1", {"preset": "tiny", "path": None}
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move away from the copy-initialisation so the load is observable
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = save_adapter(adapter, tmp_path / "adapter.safetensors", metadata={"global_step": "5"})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["persona"])  # one sorted entry: the same weights give the same bytes
    assert save_adapter(adapter, tmp_path / "again.safetensors", metadata={"global_step": "5"}).read_bytes() == path.read_bytes()
    assert keys == set(adapter.state_dict().keys())
    assert all(k.startswith(("conditioner.", "injection.")) for k in keys)
    assert len(keys) == 6 + 3 * len(cross_attention_layers(unet_a))  # 4 Linear + LayerNorm (w, b); q/k/v per layer
    assert (meta["method"], meta["phase"], meta["global_step"]) == ("wplus", "stage1", "5")
    assert json.loads(meta["conditioner"])["key"] == "wplus" and len(json.loads(meta["injection"])["layers"]) == 7
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed

    loaded = load_adapter(path)  # the file alone: method, configs, weights
    assert type(loaded.conditioner) is WProj and type(loaded.injection) is ResidualAttention and loaded.phase == "stage1"
    loaded.install(SimpleNamespace(unet=unet_b))
    with torch.no_grad():
        with adapter.injection.conditioned(adapter.tokens({"wplus": w})):
            out_a = unet_a(x, t, text).sample
        with loaded.injection.conditioned(loaded.tokens({"wplus": w})):
            out_b = unet_b(x, t, text).sample
    assert torch.equal(out_a, out_b)
    assert all(not p.requires_grad for n, p in unet_b.named_parameters() if ".processor." not in n)


def test_save_adapter_is_atomic(tiny, tmp_path, monkeypatch):
    """A write that dies before the rename leaves the previous adapter file intact and no temporary."""
    import pipeline.store

    adapter = wplus_adapter(copy.deepcopy(tiny.unet))
    path = save_adapter(adapter, tmp_path / "adapter.safetensors")
    before = path.read_bytes()
    calls = []

    def dying_fsync(fd):
        calls.append(fd)
        raise OSError("disk gone")

    with torch.no_grad():
        next(adapter.parameters()).add_(1.0)
    monkeypatch.setattr(pipeline.store.os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="disk gone"):
        save_adapter(adapter, path)
    assert calls and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]
    monkeypatch.undo()
    save_adapter(adapter, path)
    assert path.read_bytes() != before


def test_folder_roundtrip_and_single_file_needs_config(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "sd")
    comps = load_diffusion(tmp_path / "sd", device="cpu")
    assert comps.weights_real and set(comps.info) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert not tiny.weights_real
    ids = comps.tokenize(PROMPTS[:1])
    assert ids.shape == (1, 77) and ids[0, 0] == build_tiny_tokenizer().bos_token_id
    assert torch.equal(comps.encode_prompt(PROMPTS[:1]), tiny.encode_prompt(PROMPTS[:1]))
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="config"):
        load_diffusion(ckpt, device="cpu")


# ------------------------------------------------------------------------------------- (d)
def test_stage1_overfits_eight_samples(tiny, unet):
    g = torch.Generator().manual_seed(0)
    n = 8
    images = torch.rand(n, 3, 64, 64, generator=g) * 2 - 1
    latents = tiny.encode_images(images, generator=torch.Generator().manual_seed(1))
    assert latents.shape == (n, 4, 8, 8)
    w = torch.randn(n, 18, 512, generator=g)
    text = tiny.encode_prompt(PROMPTS * 2)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (n,), generator=g)
    noisy = tiny.noise_scheduler.add_noise(latents, noise, timesteps)

    base_before = {k: v.clone() for k, v in unet.state_dict().items()}
    adapter = wplus_adapter(unet)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(200):
        with adapter.injection.conditioned(adapter.tokens({"wplus": w})):
            loss = noise_mse(unet(noisy, timesteps, text).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] <= 0.5 * losses[0]:
            break
    assert losses[-1] <= 0.5 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())  # the base UNet did not move
