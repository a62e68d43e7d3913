"""Hybrid guidance (FaceStudio) on the tiny model: the region-masked attention confines each identity
to its region at every processor of every UNet level, one full region is the single-identity
processor bit for bit, (1, 0) mixing is identity A alone, the style / face dropout rates, what a
training step changes, and `persona generate --content ... --ref ... --ref ...` end to end."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import Params
from pipeline.models.diffusion import build_random
from pipeline.shards import synthetic_samples, write_tar
from training.adapter import read_adapter_file
from training.adapters import DecoupledAttention
from training.adapters.attention import merge_heads, multihead
from training.adapters.region_attention import OUTSIDE, RegionAttention, level_grid, region_labels
from training.methods.hybrid_guidance import CLIP_KEY, FACE_KEY, HybridLinear, drop_inputs, input_dropout
from training.step import SampleDraws

from tests.test_training import make_params

CLIP_DIM = 16  # the tiny random CLIP model's projection dim (pipeline.models.clip.TINY_CONFIG)
T = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _installed(cls=RegionAttention, seed: int = 0, **kw):
    """Tiny SD components with `cls` installed, its identity K/V moved away from the text K/V."""
    comps = build_random("tiny", device="cpu").freeze()
    inj = cls(**kw).install(comps)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in inj.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return comps, inj


def _unet(comps, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, comps.cross_attention_dim, generator=g)
    return lambda: comps.unet(zt, torch.tensor([500]), text).sample


# ============================================================================================
# the region-masked attention


def test_level_grid_and_labels():
    assert level_grid(8, 8, 64) == (8, 8) and level_grid(8, 8, 16) == (4, 4) and level_grid(64, 88, 88) == (8, 11)
    assert level_grid(8, 11, 24) == (4, 6) and level_grid(8, 11, 6) == (2, 3)
    with pytest.raises(ValueError, match="do not match"):
        level_grid(8, 8, 10)
    r = torch.zeros(1, 2, 8, 8)
    r[0, 0, :, :4] = 1
    r[0, 1, :, 5:] = 1  # column 4 is nobody's
    lab = region_labels(r, 64).view(8, 8)
    assert (lab[:, :4] == 0).all() and (lab[:, 5:] == 1).all() and (lab[:, 4] == -1).all()
    assert (region_labels(r, 16).view(4, 4)[:, :2] == 0).all()  # pooled to the 4 x 4 level: majority cover


def _record_branches(inj):
    """Wrap every processor's branch: [(layer, query, tokens, output)] of each call."""
    calls = []
    for name, proc in inj.processors().items():
        orig = proc.branch

        def wrapped(attn, query, hidden, tokens, _orig=orig, _name=name, _proc=proc):
            out = _orig(attn, query, hidden, tokens)
            calls.append((_name, _proc, attn, query.detach(), tokens.detach(), out.detach()))
            return out

        object.__setattr__(proc, "branch", wrapped)
    return calls


@pytest.mark.parametrize("outside", OUTSIDE)
def test_two_regions_every_processor_every_level_zero_weight_on_the_other_identity(outside):
    comps, inj = _installed(outside=outside)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(1, 2, T, comps.cross_attention_dim, generator=g)
    regions = torch.zeros(1, 2, 8, 8)  # latent resolution: A = left 3 columns, B = right 3, the middle nobody's
    regions[0, 0, :, :3] = 1
    regions[0, 1, :, 5:] = 1
    probs: dict[str, torch.Tensor] = {}
    inj.set_probe(lambda name, p: probs.__setitem__(name, p))
    calls = _record_branches(inj)
    inj.set_tokens(tokens, regions=regions)
    _unet(comps)()

    assert set(probs) == set(inj.processors()) and len(probs) == 7
    sizes = set()
    for name, p in probs.items():
        n = p.shape[2]
        sizes.add(n)
        lab = region_labels(regions, n)[0]  # (N,)
        a, b = lab == 0, lab == 1
        assert a.any() and b.any(), (name, n)
        # exactly zero weight on the other identity's tokens, a distribution over one's own
        assert torch.count_nonzero(p[0, :, a][..., 1, :]) == 0, name
        assert torch.count_nonzero(p[0, :, b][..., 0, :]) == 0, name
        torch.testing.assert_close(p[0, :, a][..., 0, :].sum(-1), torch.ones_like(p[0, :, a][..., 0, 0]))
        torch.testing.assert_close(p[0, :, b][..., 1, :].sum(-1), torch.ones_like(p[0, :, b][..., 1, 0]))
        out = lab < 0
        if outside == "none":
            assert torch.count_nonzero(p[0, :, out]) == 0
        else:  # all / mean: one distribution over all identities' tokens
            torch.testing.assert_close(p[0, :, out].sum((-1, -2)), torch.ones_like(p[0, :, out][..., 0, 0]))
    assert sizes == {64, 16}, "the 8 x 8 and the 4 x 4 levels"

    # the probabilities are what the output is made of: out == P @ V at every processor
    for name, proc, attn, query, tok, out in calls:
        v = multihead(proc.to_v_id(tok.flatten(1, 2)), attn.heads)  # (B, heads, K*T, d)
        expect = merge_heads(probs[name].flatten(-2) @ v)
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-4)

    # identity B's tokens cannot reach region A: with them changed, every processor's output on
    # region A is bit-identical (each processor on the same query; the UNet mixes positions between them)
    other = tokens.clone()
    other[:, 1] = torch.randn(other[:, 1].shape, generator=g)
    _check_branch_isolation(inj, comps, tokens, other, regions)


def _attn_layers(comps):
    from training.adapters import cross_attention_layers

    return [(n.replace(".", "_"), m) for n, m in cross_attention_layers(comps.unet)]


def _check_branch_isolation(inj, comps, tokens, other, regions):
    """Each processor on the same query, with identity B's tokens replaced: A's rows do not change."""
    g = torch.Generator().manual_seed(5)
    for name, attn in _attn_layers(comps):
        proc = inj.processors()[name]
        for size in (64, 16):
            query = torch.randn(1, attn.heads, size, attn.to_q.out_features // attn.heads, generator=g)
            hidden = torch.zeros(1, size, attn.to_q.out_features)
            inj.set_tokens(tokens, regions=regions)
            x = type(proc).branch(proc, attn, query, hidden, tokens)
            y = type(proc).branch(proc, attn, query, hidden, other)
            lab = region_labels(regions, size)[0]
            assert torch.equal(x[0, lab == 0], y[0, lab == 0]), name
            assert not torch.equal(x[0, lab == 1], y[0, lab == 1]), name


def test_one_full_region_is_the_single_identity_processor_exactly():
    comps, region = _installed(RegionAttention)
    state = region.state_dict()
    g = torch.Generator().manual_seed(3)
    tok = torch.randn(1, T, comps.cross_attention_dim, generator=g)
    run = _unet(comps)
    region.set_tokens(tok[:, None], regions=torch.ones(1, 1, 8, 8))
    full = run()
    region.set_tokens(tok)
    single_region = run()
    region.remove()
    dec = DecoupledAttention().install(comps)
    dec.load_state_dict(state)  # the same tensors (to_k_id, to_v_id per layer)
    dec.set_tokens(tok)
    single = run()
    assert torch.equal(full, single) and torch.equal(single_region, single)
    dec.scale = 0.0
    assert not torch.equal(run(), single), "the identity must matter"


# ============================================================================================
# conditioner and dropout


def test_style_and_face_dropout_rates_over_2000_draws():
    n, p_s, p_f = 2000, 0.64, 0.1
    draws = SampleDraws(seed=0, positions=list(range(n)))
    draws.standard((4, 8, 8), 1000)  # the step's own draws come first, as in training
    ds, df = input_dropout(draws, p_s, p_f)
    for rate, p in ((ds.float().mean(), p_s), (df.float().mean(), p_f), ((ds & df).float().mean(), p_s * p_f)):
        se = (p * (1 - p) / n) ** 0.5
        assert abs(float(rate) - p) < 3 * se, (float(rate), p)
    inputs = {CLIP_KEY: torch.ones(n, CLIP_DIM), FACE_KEY: torch.ones(n, 512)}
    out = drop_inputs(inputs, ds, df)
    assert torch.equal(out[CLIP_KEY].sum(1) == 0, ds) and torch.equal(out[FACE_KEY].sum(1) == 0, df)
    # the draws are the sample's own: the same positions give the same drops in any batch split
    part = SampleDraws(seed=0, positions=list(range(1000, 1010)))
    part.standard((4, 8, 8), 1000)
    assert torch.equal(input_dropout(part, p_s, p_f)[0], ds[1000:1010])


def test_conditioner_is_one_linear_over_the_concatenation():
    c = HybridLinear(cross_dim=32, clip_dim=CLIP_DIM, tokens=T)
    x = {CLIP_KEY: torch.randn(3, CLIP_DIM), FACE_KEY: torch.randn(3, 512)}
    tok = c(x)
    assert tok.shape == (3, T, 32)
    expect = (torch.cat([x[CLIP_KEY], x[FACE_KEY]], 1) @ c.proj.weight.T + c.proj.bias).view(3, T, 32)
    torch.testing.assert_close(tok, expect)
    with pytest.raises(ValueError, match="clip_dim"):
        c({CLIP_KEY: torch.randn(3, 8), FACE_KEY: torch.randn(3, 512)})


# ============================================================================================
# training


def write_hybrid_shards(root: Path, n: int = 10, seed: int = 3) -> Path:
    """Synthetic shard samples (jpg, txt, id.npy, ...) + a clip.npy member of the tiny CLIP's width."""
    rng = np.random.default_rng(seed)
    samples = synthetic_samples(n, identities=5, seed=seed, size=64, encoded=True)
    rows = []
    for s in samples:
        buf = io.BytesIO()
        np.save(buf, rng.standard_normal(CLIP_DIM).astype(np.float32))
        rows.append([(f"{s['__key__']}.{k}", v) for k, v in s.items() if k != "__key__"]
                    + [(f"{s['__key__']}.clip.npy", buf.getvalue())])
    write_tar(root / "train" / "train-000000.tar", iter(rows[: n - 2]))
    write_tar(root / "val" / "val-000000.tar", iter(rows[n - 2:]))
    return root


def hybrid_params(tmp: Path, shards: Path, **main_cfg) -> dict:
    p = make_params(tmp, method="hybrid_guidance", train={"synthetic": 0, "shards": str(shards)},
                    main={"max_steps": 1, "batch_size": 2, "log_every": 1, "lr": 1e-2, **main_cfg})
    p["train"]["methods"].pop("wplus")
    p["train"]["methods"]["hybrid_guidance"]["conditioner"] = {"clip_dim": CLIP_DIM, "tokens": T}
    return p


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_hybrid_shards(tmp_path_factory.mktemp("hybrid_shards"))


class _BaseWeights:
    """Lightning callback: the frozen base parts' tensors at the start and at the end of training."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class Seen(Callback):
            def __init__(self):
                self.start, self.end = {}, {}

            @staticmethod
            def _grab(m):
                return {f"{part}.{k}": v.detach().clone() for part in ("unet", "vae", "text_encoder")
                        for k, v in getattr(m, part).state_dict().items() if ".processor." not in k}

            def on_train_start(self, trainer, pl_module):
                self.start = self._grab(pl_module)

            def on_train_end(self, trainer, pl_module):
                self.end = self._grab(pl_module)

        return Seen()


@pytest.mark.parametrize("train_unet", [False, True])
def test_a_step_changes_the_linear_and_the_identity_attention_and_the_unet_only_with_train_unet(tmp_path, shards,
                                                                                             train_unet):
    from training.step import seed_of
    from training.train import train

    seen = _BaseWeights()
    res = train(hybrid_params(tmp_path, shards, train_unet=train_unet), "hybrid_guidance", "main", callbacks=[seen])
    assert res["global_step"] == 1
    tensors, meta = read_adapter_file(res["adapter"])
    assert json.loads(meta["trained_base"]) == (["unet"] if train_unet else [])
    # the Linear moved from its (seeded) init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of("hybridlinear-init", 0) % (2**63))
        init = HybridLinear(cross_dim=32, clip_dim=CLIP_DIM, tokens=T)
    assert not torch.equal(tensors["conditioner.proj.weight"], init.proj.weight)
    # the identity attention moved from its init (copies of the base layers' to_k / to_v)
    base = build_random("tiny", device="cpu").unet.state_dict()
    k = "down_blocks_0_attentions_0_transformer_blocks_0_attn2"
    src = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert not torch.equal(tensors[f"injection.attn.{k}.to_k_id.weight"], base[f"{src}.to_k.weight"])
    assert not torch.equal(tensors[f"injection.attn.{k}.to_v_id.weight"], base[f"{src}.to_v.weight"])
    changed = sorted({name.split(".")[0] for name in seen.start if not torch.equal(seen.start[name], seen.end[name])})
    assert changed == (["unet"] if train_unet else []), changed  # VAE and text encoder never; the UNet only then
    if train_unet:
        assert any(not torch.equal(tensors[f"base.unet.{n}"], v) for n, v in base.items() if f"base.unet.{n}" in tensors)


# ============================================================================================
# generation: mixing, several people, the text path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, shards) -> Path:
    from training.train import train

    tmp = tmp_path_factory.mktemp("hybrid_adapter")
    res = train(hybrid_params(tmp, shards, max_steps=2), "hybrid_guidance", "main")
    return Path(res["adapter"]).parent


def test_mixing_weights_one_zero_equal_identity_a_alone(sample_raw, adapter_dir, tmp_path):
    from training.generate import GenerateConfig, Generator, Request, generate
    from training.methods.base import Identity
    from training.references import ReferenceKit

    gen = Generator.load(str(adapter_dir), device="cpu", dtype="fp32")
    a, b = (str(sample_raw / "sample" / p) for p in ("obama/obama.jpg", "biden/biden.jpg"))
    cfg = GenerateConfig(steps=3, guidance=3.0, device="cpu", scheduler="euler_a")
    kit = ReferenceKit(Params(), device="cpu")
    try:
        alone = generate(Request(["a person"], [Identity([a])], name="a"), cfg, generator=gen, kit=kit, out=tmp_path)[0]
        mixed = generate(Request(["a person"], [Identity([a, b], [1.0, 0.0])], name="ab"), cfg, generator=gen, kit=kit,
                         out=tmp_path)[0]
        half = generate(Request(["a person"], [Identity([a, b], [0.5, 0.5])], name="h"), cfg, generator=gen, kit=kit,
                        out=tmp_path)[0]
    finally:
        kit.close()
    assert mixed["image"]["sha256"] == alone["image"]["sha256"]
    assert half["image"]["sha256"] != alone["image"]["sha256"], "the mix must matter"
    assert mixed["conditioning"][0]["weights"] == [1.0, 0.0]
    fa, fb = (np.load(tmp_path / f"{n}.id0.face.npy") for n in ("a", "h"))
    assert not np.array_equal(fa, fb)


def test_persona_generate_several_people_from_a_content_photo_and_rerun(sample_raw, adapter_dir, tmp_path, capsys):
    from pipeline.images import decode_image
    from training.references import ReferenceKit

    group = sample_raw / "unlabeled" / "gdp.jpg"
    a, b = (str(sample_raw / "sample" / p) for p in ("obama/obama.jpg", "biden/biden.jpg"))
    out = tmp_path / "out"
    argv = ["generate", "--adapter", str(adapter_dir), "--content", str(group), "--ref", a, "--ref", b,
            "--assign", "2,0", "--strength", "0.6", "--prompt", "two players", "--steps", "4", "--device", "cpu",
            "--scheduler", "euler_a", "--out", str(out), "--name", "g"]
    assert main(argv) == 0
    rec = json.loads((out / "g-p00-seed0.json").read_text())
    c = rec["content"]
    assert c["assignment"] == [2, 0] and c["strength"] == 0.6 and len(c["persons"]) == 3
    labels = decode_image((out / c["instances"]["file"]).read_bytes())
    img = decode_image((out / rec["image"]["file"]).read_bytes())
    assert labels.shape == img.shape[:2] == (88, 64)  # the portrait photo keeps its aspect
    masks = [decode_image(Path(e["region"]).read_bytes()) > 0 for e in rec["conditioning"]]
    assert np.array_equal(masks[0], labels == 3) and np.array_equal(masks[1], labels == 1)
    assert masks[0].any() and masks[1].any() and not (masks[0] & masks[1]).any()
    assert [e["style"]["source"] for e in rec["conditioning"]] == ["content photo"] * 2
    # the persons: the instance split of the photo, left to right
    kit = ReferenceKit(Params(), device="cpu")
    try:
        full, faces = kit.persons(group)
    finally:
        kit.close()
    assert [f["bbox"] for f in faces] == [p["bbox"] for p in c["persons"]]
    assert all(full[int(round((f["bbox"][1] + f["bbox"][3]) / 2)), int(round((f["bbox"][0] + f["bbox"][2]) / 2))] == i + 1
               for i, f in enumerate(faces))
    # the record re-runs to the same pixels, from another folder too
    assert main(["generate", "--from-json", str(out / "g-p00-seed0.json"), "--check", "--out", str(tmp_path / "re")]) == 0
    assert "IDENTICAL" in capsys.readouterr().out
    # the assignment matters
    swapped = [("0,2" if x == "2,0" else "g2" if x == "g" else x) for x in argv]
    assert main(swapped) == 0
    assert json.loads((out / "g2-p00-seed0.json").read_text())["image"]["sha256"] != rec["image"]["sha256"]


def test_text_guidance_is_refused_without_a_prior(adapter_dir, sample_raw, capsys):
    a = str(sample_raw / "sample" / "obama" / "obama.jpg")
    argv = ["generate", "--adapter", str(adapter_dir), "--ref", a, "--prompt", "x", "--steps", "1", "--device", "cpu",
            "--text-guidance", "0.5", "--style-text", "a cartoon"]
    assert main(argv) == 1
    assert "--text-guidance needs a text prior, and none is configured" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--no-such-flag 1 \(the flags of method 'hybrid_guidance': --text-guidance"):
        main([*argv[:-4], "--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        main(["stages", "--text-guidance", "0.5"])  # other commands still reject unknown arguments


def _tiny_prior(folder: Path, dim: int = CLIP_DIM) -> Path:
    """A tiny KandinskyPriorPipeline (random weights) in the diffusers folder format."""
    from diffusers import KandinskyPriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from pipeline.models.diffusion import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=dim,
                             num_embeddings=77, additional_embeddings=4)
    with torch.no_grad():  # the embedding statistics the prior de-normalises with (zeros at init)
        prior.clip_mean.normal_()
        prior.clip_std.fill_(1.0)
    small = dict(hidden_size=dim, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=dim)
    KandinskyPriorPipeline(
        prior=prior,
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=16, **small)),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77,
                                                                bos_token_id=tok.bos_token_id,
                                                                eos_token_id=tok.eos_token_id, **small)),
        tokenizer=tok,
        scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample=True,
                                  clip_sample_range=10.0),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    ).save_pretrained(folder)
    return folder


def test_text_path_mixes_the_priors_embedding_with_the_style(adapter_dir, sample_raw, tmp_path):
    from training.generate import GenerateConfig, Generator, Request, generate
    from training.methods.base import Identity
    from training.methods.hybrid_guidance import text_embedding
    from training.references import ReferenceKit

    prior = _tiny_prior(tmp_path / "prior")
    gen = Generator.load(str(adapter_dir), device="cpu", dtype="fp32")
    a = str(sample_raw / "sample" / "obama" / "obama.jpg")
    cfg = GenerateConfig(steps=2, guidance=3.0, device="cpu")
    kit = ReferenceKit(Params(), device="cpu")
    try:
        def run(name, **options):
            return generate(Request(["a person"], [Identity([a])], options={k: str(v) for k, v in options.items()},
                                    name=name), cfg, generator=gen, kit=kit, out=tmp_path)[0]

        plain = run("plain")
        half = run("half", text_guidance=0.5, style_text="a cartoon", text_prior=prior)
        zero = run("zero", text_guidance=0.0, style_text="a cartoon", text_prior=prior)
        e_t, info = text_embedding(kit, str(prior), "a cartoon", CLIP_DIM)
        with pytest.raises(ValueError, match="gives 16-d image embeddings, the conditioner takes clip_dim 8"):
            text_embedding(kit, str(prior), "a cartoon", 8)
    finally:
        kit.close()
    e_i = np.load(tmp_path / "plain.id0.clip.npy")
    np.testing.assert_allclose(np.load(tmp_path / "half.id0.clip.npy"), 0.5 * e_t + 0.5 * e_i, atol=1e-6)
    assert np.array_equal(np.load(tmp_path / "zero.id0.clip.npy"), e_i)
    assert zero["image"]["sha256"] == plain["image"]["sha256"] != half["image"]["sha256"]
    text = half["conditioning"][0]["text"]
    assert text["alpha"] == 0.5 and text["text"] == "a cartoon" and text["prior"]["fingerprint"] == info["fingerprint"]
    assert abs(np.linalg.norm(e_t) - 1) < 1e-5  # normalised like the clip_image embeddings


# ============================================================================================
# evaluation: per-region identity of two-person images


def test_region_identity_scores_each_half_against_its_own_identity():
    """face i left, face i+1 right: each region's largest detected face is scored against that
    region's identity; a region without a face counts 0; the regions reach the generator."""
    from types import SimpleNamespace

    from training.evaluate import EvalFace, EvaluateConfig, missing, value
    from training.methods.hybrid_guidance import faces_by_half, half_regions, region_identity

    def face(cx, size=20.0, source="mesh"):
        lm5 = np.array([[cx - 5, 20], [cx + 5, 20], [cx, 26], [cx - 4, 32], [cx + 4, 32]], np.float64)
        return SimpleNamespace(lm5=lm5, bbox=(cx - size / 2, 10, cx + size / 2, 10 + size), landmarks_source=source)

    # the largest face per half; a detector-only fallback face is skipped
    small, big = face(10, 8), face(20, 16)
    assert faces_by_half([small, big, face(50, 30, source="detector")], 64) == [big, None]
    r = half_regions(4, 6)
    assert r.shape == (2, 4, 6) and r[0, :, :3].all() and not r[0, :, 3:].any() and r.sum(0).eq(1).all()

    embs = {k: np.eye(4, dtype=np.float32)[k] for k in range(3)}  # identity k's unit embedding
    faces = [EvalFace(key=f"k{k}", identity=f"id{k}", face=np.zeros((8, 8, 3), np.uint8),
                      meta={"landmarks_aligned": [[0, 0]] * 5}, sample={}, id_emb=embs[k]) for k in range(3)]
    calls = []

    class Gen:
        method = SimpleNamespace(prompt=lambda p, a: p)
        adapter = None

        def sample(self, conditioning, prompts, seeds, **kw):
            calls.append((conditioning, kw["regions"].shape))
            # image value = the pair's left identity; the detector finds faces from it
            return [np.full((64, 64, 3), c[0]["i"], np.uint8) for c in conditioning]

    class Detector:
        def detect(self, img):  # pair (i, i+1): a face in both halves, except for pair 2 (right half empty)
            return [face(16), face(48)] if img[0, 0, 0] != 2 else [face(16)]

    class Scorer:
        detector = Detector()

        def embed_aligned(self, images, lms):  # the left face looks like identity i, the right like identity 0
            i = int(images[0][0, 0, 0])
            return np.stack([embs[i] if lm[0, 0] < 32 else embs[0] for lm in lms])

    run = SimpleNamespace(faces=faces, inputs=[{"i": k} for k in range(3)], scorer=Scorer(), generator=Gen(), size=64,
                          cfg=EvaluateConfig(batch_size=2, steps=1))
    out = region_identity(run, value, missing)
    assert [len(c) for c, _ in calls] == [2, 1] and calls[0][1] == (2, 2, 64, 64)
    assert [[x["i"] for x in pair] for c, _ in calls for pair in c] == [[0, 1], [1, 2], [2, 0]]
    # pair 0: left id0 vs id0 = 1, right looks id0 vs id1 = 0; pair 1: 1, id0 vs id2 = 0; pair 2: 1, no face = 0
    m = out["region_identity_similarity"]
    assert m["value"] == pytest.approx(3 / 6) and m["n"] == 6 and m["no_face_counts_as"] == 0.0
    assert out["region_identity_similarity_detected"]["value"] == pytest.approx(3 / 5)
    one = region_identity(SimpleNamespace(**{**vars(run), "faces": faces[:1]}), value, missing)
    assert "needs >= 2 evaluation faces" in one["region_identity_similarity"]["missing"]
