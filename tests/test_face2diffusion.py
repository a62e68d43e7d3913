"""Face2Diffusion on the tiny model: the mappers alone train, the pseudo words touch the text encoder
only from the identifier on, the CGDR target, the null expression's rate, the MSID shapes, and the
`persona generate --method face2diffusion` path end to end."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models import expression as E
from pipeline.models.diffusion import build_random
from pipeline.shards import encoded_members, synthetic_samples, write_tar
from training import methods
from training.adapters.msid import MSIDEncoder, OUT_DIM, TAPS, WIDTH, load_msid
from training.adapters.pseudo_words import PseudoWordInjection, identifier_positions
from training.losses import cgdr_target
from training.methods import face2diffusion as F
from training.step import SampleDraws

M = "face2diffusion"
PHOTOS = "sample"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_f2d_shards(root: Path, n: int = 8, val: int = 2, seed: int = 3) -> Path:
    """Tiny REAL shards (the pipeline's tar writer) with expr.npy (mesh-descriptor shaped) members."""
    rng = np.random.default_rng(seed)
    samples = synthetic_samples(n + val, identities=5, seed=seed, size=128, encoded=True)
    rows = []
    for s in samples:
        meta = json.loads(s["json"])
        meta["models"]["expression"] = {"name": f"mediapipe-{E.VERSION}", "fingerprint": "x", "weights_real": True}
        s = {**s, "json": json.dumps(meta).encode()}
        members = [m for m in encoded_members(s) if not m[0].endswith(".json")]
        e = (0.5 + 0.1 * rng.standard_normal(E.DIM)).astype(np.float32)
        rows.append(members + [(f"{s['__key__']}.expr.npy", _npy(e)), (f"{s['__key__']}.json", s["json"])])
    write_tar(root / "train" / "train-000000.tar", rows[:n])
    write_tar(root / "val" / "val-000000.tar", rows[n:])
    return root


def params(tmp: Path, shards: Path, **main) -> dict:
    return {"train": {
        "shards": str(shards), "num_workers": 0, "threads": 1, "resolution": 64,
        "out_dir": str(tmp / "models"), "checkpoints_dir": str(tmp / "checkpoints"), "metrics_dir": str(tmp / "metrics"),
        "plots_dir": str(tmp / "plots"), "mlflow": {"enabled": False}, "sampling": {"num_faces": 2, "steps": 2},
        "methods": {M: {"main": {"max_steps": 2, "batch_size": 2, "log_every": 1, "sample_every": 0,
                                 "checkpoint_every": 2, "lr": 1e-3, **main}}}}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_f2d_shards(tmp_path_factory.mktemp("f2d_shards"))


def _module(tmp: Path, shards: Path, **main):
    """The LightningModule of F2D's phase on the tiny model, its data module and a first batch."""
    from training.config import train_params
    from training.data import PersonaDataModule
    from training.module import PersonaModule
    from training.train import build_adapter, load_components

    tp = train_params(params(tmp, shards, **main))
    m = methods.get(M)
    ph = m.phase("main")
    comps = load_components(tp.train)
    dm = PersonaDataModule(m, ph, tp.train, tp.phase(M, "main"))
    dm.setup()
    adapter, _ = build_adapter(m, ph, tp, comps, source=dm.train_source)
    module = PersonaModule(m, ph, tp.phase(M, "main"), tp.train.seed, comps, adapter)
    return module, dm.dataset().batch(0), comps


# ============================================================================================
# training: only the mappers change


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_a_training_step_changes_the_mappers_and_nothing_else(tmp_path, shards):
    module, batch, comps = _module(tmp_path, shards, expression_drop=0.5)
    module.train()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapter.conditioner.") for n in trainable)
    assert not list(module.adapter.injection.parameters())  # the injection has no tensors of its own
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    loss = module.training_step(batch, 0)
    loss.backward()
    opt.step()
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert changed <= trainable
    assert any(".mappers.0." in n for n in changed) and any(".mappers.1." in n for n in changed)
    # the frozen UNet, VAE and text encoder, and the standardisation buffers, are untouched
    assert all(torch.equal(b, buffers[n]) for n, b in module.named_buffers())
    frozen = [n for n in before if not n.startswith("adapter.")]
    assert frozen and all(torch.equal(dict(module.named_parameters())[n], before[n]) for n in frozen)


def test_calibration_standardises_the_expression_with_the_training_set(tmp_path, shards):
    module, batch, _ = _module(tmp_path, shards)
    cond = module.adapter.conditioner
    from pipeline.shard_reader import ShardIndex, shard_urls

    idx = ShardIndex(shard_urls(shards, "train"), ("expr.npy",))
    a = np.stack([idx.get(i, ("expr.npy",))["expr.npy"] for i in range(len(idx))]).astype(np.float64)
    assert np.allclose(cond.expr_mean.numpy(), a.mean(0), atol=1e-6)
    assert np.allclose(cond.expr_std.numpy(), a.std(0), atol=1e-6)
    assert cond.expression_source == f"mediapipe-{E.VERSION}"
    z = cond.expression({"expr": torch.from_numpy(a[:2].astype(np.float32)), "expr_mask": torch.ones(2)}, 2)
    assert torch.allclose(z, torch.from_numpy((a[:2] - a.mean(0)) / a.std(0)).float(), atol=1e-5)


# ============================================================================================
# the null expression


def test_the_null_expression_replaces_it_in_20_percent_of_2000_draws():
    draws = SampleDraws(seed=0, positions=list(range(2000)))
    draws.standard((4, 8, 8), 1000)  # what StepContext draws first, as in training
    keep = F.expression_keep(draws, 0.2)
    p, n = 0.2, 2000
    rate = 1 - keep.float().mean().item()
    assert abs(rate - p) < 3 * np.sqrt(p * (1 - p) / n), rate
    assert F.MainConfig().expression_drop == 0.2


def test_dropped_rows_get_the_learned_null_vector():
    cond = F.F2DMapper(width=16, tokens=2, expr_dim=E.DIM).eval()
    with torch.no_grad():
        cond.null_expr.copy_(torch.linspace(-1, 1, E.DIM))
    ident = torch.nn.functional.normalize(torch.randn(3, 512), dim=-1)
    e = torch.randn(3, E.DIM)
    mask = torch.tensor([1.0, 0.0, 1.0])
    out = cond({"id": ident, "face": torch.zeros(3, 3, 112, 112, dtype=torch.uint8), "expr": e, "expr_mask": mask})
    other = cond({"id": ident, "face": torch.zeros(3, 3, 112, 112, dtype=torch.uint8), "expr": torch.randn(3, E.DIM),
                  "expr_mask": mask})
    assert out.shape == (3, 2, 16)
    assert torch.equal(out[1], other[1]) and not torch.equal(out[0], other[0])
    v = cond.expression({"expr": e, "expr_mask": mask}, 3)
    assert torch.equal(v[1], cond.null_expr.detach())
    assert torch.count_nonzero(F.F2DMapper(width=16).null_expr) == 0  # zero-initialised


# ============================================================================================
# the pseudo-word injection


def test_the_text_encoder_changes_only_from_the_identifier_on_and_not_without_it():
    comps = build_random("tiny", device="cpu").freeze()
    tok = comps.tokenizer

    def encode(prompts):
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return comps.text_encoder(ids)[0], ids

    with_id, without = "a photo of f l smiling", "a photo of a person smiling"
    base_with, ids = encode([with_id])
    base_without, _ = encode([without])
    inj = PseudoWordInjection("f l").install(comps)
    try:
        inj.set_tokens(torch.randn(1, 2, comps.text_encoder.config.hidden_size))
        out_with, _ = encode([with_id])
        out_without, _ = encode([without])
        where = identifier_positions(ids, torch.tensor(inj.token_ids(tok, "f l")))[0]
        first = int((where >= 0).nonzero()[0])
        assert where[first] == 0 and where[first + 1] == 1 and int((where >= 0).sum()) == 2
        assert torch.equal(out_with[0, :first], base_with[0, :first])  # causal: nothing before it moves
        assert not torch.equal(out_with[0, first], base_with[0, first])
        assert not torch.equal(out_with[0, first + 1], base_with[0, first + 1])
        diff = (out_with[0] - base_with[0]).abs().amax(-1)
        assert bool((diff[first:] > 0).all())
        assert torch.equal(out_without, base_without)  # no identifier: the base text encoder, bit for bit
        inj.scale = 0.0
        assert torch.equal(encode([with_id])[0], base_with)
    finally:
        inj.remove()
    assert torch.equal(encode([with_id])[0], base_with)


def test_prompts_for_any_method_get_the_identifier():
    class A:
        injection = PseudoWordInjection("f l")

    m = methods.get(M)
    assert m.prompt("a photo of a face", A) == "a photo of f l"
    assert m.prompt("a close-up photo of a person smiling", A) == "a close-up photo of f l smiling"
    assert m.prompt("f l eating bread", A) == "f l eating bread"
    assert m.prompt("a watercolour landscape", A) == "f l, a watercolour landscape"


# ============================================================================================
# CGDR


def test_cgdr_target_against_a_hand_computation():
    eps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    eps_c = torch.tensor([[[[10.0, 20.0], [30.0, 40.0]]]])
    face = torch.tensor([[[[1.0, 0.0], [0.25, 0.5]]]])  # 1 = face
    want = torch.tensor([[[[1.0, 20.0], [0.25 * 3 + 0.75 * 30, 0.5 * 4 + 0.5 * 40]]]])
    assert torch.allclose(cgdr_target(eps, eps_c, face), want)


def test_the_phase_loss_is_the_mse_to_the_cgdr_target():
    """Main.loss wires eps_hat (identifier prompt), eps_hat_c (class prompt, no grad) and the face mask."""
    g = torch.Generator().manual_seed(0)
    eps_hat = torch.randn(2, 4, 2, 2, generator=g, requires_grad=True)
    eps_c = torch.randn(2, 4, 2, 2, generator=g)
    noise = torch.randn(2, 4, 2, 2, generator=g)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8] = 1.0  # the face: top half of the image

    class Ctx:
        inputs = {"expr_mask": torch.ones(2)}
        batch = {"prompt": ["a photo of f l"] * 2, "mask": mask}
        target = noise
        draws = SampleDraws(0, [0, 1])
        calls: list = []

        def unet(self, tokens, *, scale=1.0, prompts=None):
            self.calls.append((tokens, scale, prompts, torch.is_grad_enabled()))
            return eps_c

        def predict(self):
            self.calls.append(("predict", torch.is_grad_enabled()))
            return eps_hat

    ctx = Ctx()
    out = F.Main().loss(ctx, F.MainConfig())
    m = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1).expand(2, 1, 2, 2)
    hand = ((eps_hat - (noise * m + eps_c * (1 - m))) ** 2).mean()
    assert torch.allclose(out["loss"], hand)
    assert ctx.calls[0] == (None, 0.0, ["a photo of a person"] * 2, False)  # frozen class pass, no gradient
    assert ctx.calls[1] == ("predict", True)
    out["loss"].backward()
    assert eps_hat.grad is not None


# ============================================================================================
# MSID


def test_msid_architecture_matches_the_paper():
    torch.manual_seed(0)
    enc = MSIDEncoder().eval()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        taps = enc.taps_features(x)
        out = enc(x)
    assert TAPS == (2, 5, 8, 11) and len(taps) == 4 and all(t.shape == (2, WIDTH) for t in taps)
    assert out.shape == (2, OUT_DIM) == (2, 1536) and torch.equal(out, torch.cat(taps, 1))
    assert enc.pos_embed.shape == (1, 197, 384) and enc.patch_embed.proj.kernel_size == (8, 8)
    assert len(enc.blocks) == 12 and enc.blocks[0].attn.heads == 12
    for t in TAPS:  # BatchNorm1d + LayerNorm per tap, named as in the released checkpoint
        norm = enc.norms[f"layer_{t}"]
        assert isinstance(norm[0], torch.nn.BatchNorm1d) and isinstance(norm[1], torch.nn.LayerNorm)
    with pytest.raises(ValueError):
        enc(torch.zeros(1, 3, 128, 128))


def test_msid_loads_a_checkpoint_in_the_released_format_and_is_tagged_random_without(tmp_path):
    torch.manual_seed(1)
    ref = MSIDEncoder().eval()
    ckpt = tmp_path / "msid.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, ckpt)
    enc, info = load_msid(str(ckpt))
    assert info["weights_real"] is True and not enc.training
    x = torch.rand(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(enc(x), ref(x))
    rnd, rinfo = load_msid(None, seed=3)
    again, _ = load_msid(None, seed=3)
    assert rinfo["weights_real"] is False and torch.equal(rnd(x), again(x))
    bad = tmp_path / "bad.pt"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="not an MSID"):
        load_msid(str(bad))
    cond = F.F2DMapper(width=16, identity="msid", msid_checkpoint=str(ckpt))
    assert cond.id_dim == 1536 and cond.weights_real() == {"msid": True}
    tokens = cond({"id": torch.zeros(2, 512), "face": torch.randint(0, 255, (2, 3, 112, 112), dtype=torch.uint8),
                   "expr": torch.zeros(2, E.DIM), "expr_mask": torch.zeros(2)})
    assert tokens.shape == (2, 2, 16)
    assert not any(k.startswith("_msid") for k in cond.state_dict())  # the frozen encoder is not saved with the adapter
    assert F.F2DMapper(width=16, identity="msid").weights_real() == {"msid": False}


def test_msid_identity_trains_on_the_shards(tmp_path, shards):
    from training.adapter import read_adapter_file
    from training.train import train

    p = params(tmp_path, shards)
    p["train"]["methods"][M]["conditioner"] = {"identity": "msid"}
    res = train(p, M, "main")
    assert res["global_step"] == 2
    assert res["record"]["weights_real"]["conditioner.msid"] is False
    tensors, meta = read_adapter_file(res["adapter"])
    assert json.loads(meta["conditioner"])["identity"] == "msid"
    assert tensors["conditioner.mappers.0.layers.0.0.weight"].shape[1] == 1536 + E.DIM


# ============================================================================================
# end to end: train, then `persona generate --method face2diffusion`


def test_train_then_generate_with_an_expression_reference_from_the_cli(tmp_path, shards, sample_raw, monkeypatch):
    import yaml

    from pipeline.cli import main
    from training.train import train

    res = train(params(tmp_path, shards, hflip=1.0), M, "main")
    rec = res["record"]
    assert rec["calibration"]["expression"]["faces"] == 8 and rec["injection"] == {"identifier": "f l"}
    assert set(res["metrics"]) >= {"loss", "loss_face", "loss_background"}
    folder = Path(res["adapter"]).parent
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "evaluate": {"adapters": {M: str(folder)}},
        "generate": {"methods": {M: {"scheduler": "euler_a", "steps": 2, "guidance": 7.0}}}}))
    monkeypatch.chdir(tmp_path)
    face = sample_raw / PHOTOS / "obama" / "obama.jpg"
    smile = sample_raw / PHOTOS / "eileen_collins" / "astronaut.png"
    assert main(["generate", "--method", M, "--ref", str(face), "--expression-ref", str(smile), "--prompt",
                 "a close-up photo of a person", "--out", "out", "--device", "cpu"]) == 0
    r = json.loads((tmp_path / "out" / "img-p00-seed0.json").read_text())
    assert r["model_prompt"] == "a close-up photo of f l" and r["scheduler"]["name"] == "euler_a" and r["steps"] == 2
    c = r["conditioning"][0]
    assert c["expression"]["kind"] == "reference" and len(c["expression"]["descriptor"]) == E.DIM
    expr = np.load(tmp_path / "out" / c["inputs"]["expr"]["file"])
    mask = np.load(tmp_path / "out" / c["inputs"]["expr_mask"]["file"])
    assert mask.reshape(-1).tolist() == [1.0] and np.abs(expr).sum() > 0
    # the flag overrides the method's steps; --expression null is the default's null vector
    assert main(["generate", "--method", M, "--ref", str(face), "--expression", "null", "--steps", "1", "--prompt",
                 "a photo of f l", "--out", "null", "--device", "cpu"]) == 0
    n = json.loads((tmp_path / "null" / "img-p00-seed0.json").read_text())
    assert n["steps"] == 1 and n["conditioning"][0]["expression"] == {"kind": "null"}
    assert np.load(tmp_path / "null" / n["conditioning"][0]["inputs"]["expr_mask"]["file"]).reshape(-1).tolist() == [0.0]
    assert main(["generate", "--from-json", str(tmp_path / "out" / "img-p00-seed0.json"), "--check"]) == 0
    with pytest.raises(SystemExit, match="flags of method 'face2diffusion'"):
        main(["generate", "--method", M, "--ref", str(face), "--expresion-ref", str(smile), "--prompt", "x"])


# ============================================================================================
# expression controllability (evaluation)


def test_expression_controllability_measures_the_generated_face_against_the_reference(sample_raw):
    """The metric's wiring with REAL MediaPipe meshes: a stand-in generator (the tiny model draws no
    faces) returns, for an expression reference, the reference photo itself (distance 0), and the
    null-expression images are the other photo; blank images are reported missing with the reason."""
    from types import SimpleNamespace

    from pipeline.images import load_rgb
    from pipeline.models.faces import MediaPipeFaces
    from training.evaluate import EvalRun, evaluate_config, missing, value
    from training.references import largest_face

    photos = [load_rgb(sample_raw / PHOTOS / p)[0] for p in ("obama/obama.jpg", "eileen_collins/astronaut.png")]
    with MediaPipeFaces() as det:
        descs = [E.descriptor(largest_face(det.detect(p)).mesh) for p in photos]
        cond = F.F2DMapper(width=16, expression_source=f"mediapipe-{E.VERSION}")
        cond.set_statistics(np.zeros(E.DIM), np.full(E.DIM, 0.1))

        class Gen:
            adapter = SimpleNamespace(conditioner=cond)
            blank = False

            def sample(self, conditioning, prompts, seeds, **kw):
                out = []
                for (c,) in conditioning:
                    hit = [i for i, d in enumerate(descs) if np.array_equal(c["expr"], d)]
                    out.append(np.zeros((64, 64, 3), np.uint8) if self.blank else photos[hit[0]])
                return out

        faces = [SimpleNamespace(key=f"k{i}", sample={"expr.npy": descs[i]}) for i in range(2)]
        inputs = [{"id": np.zeros(512, np.float32), "expr": np.zeros(E.DIM, np.float32), "expr_mask": np.float32(0)}] * 2
        cfg = evaluate_config({"prompts": ["a photo of a face"], "batch_size": 2})
        gen = Gen()
        run = EvalRun(cfg, gen, faces, inputs, [(0, 0, 0), (1, 0, 0)], [photos[0], photos[1]], ["a photo of f l"],
                      SimpleNamespace(detector=det), 64)
        m = F.expression_controllability(run, value, missing)
        # face 0 took face 1's expression: its image is photo 1 -> distance 0; its null image (photo 0) is not
        assert m["value"] == 0.0 and m["n"] == 2 and m["lower_is_better"] is True
        assert m["null_expression"] > 0.5 and [r["reference"] for r in m["per_face"]] == ["k1", "k0"]
        gen.blank = True
        m = F.expression_controllability(run, value, missing)
        assert m["value"] is None and "no face with a mesh" in m["missing"]
    cond.expression_source = "precomputed:deca"
    assert "not the mesh descriptor" in F.expression_controllability(run, value, missing)["missing"]


# ============================================================================================
# loader: the face is decoded reduced (JPEG draft), its landmarks follow the decode scale


def _smooth_face_tar(tmp: Path, size: int = 512) -> tuple[Path, np.ndarray]:
    """One real shard sample whose face.jpg is a smooth 512 px picture with landmarks in its frame."""
    from PIL import Image

    from pipeline.models.align import ARCFACE_TEMPLATE

    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    face = np.stack([128 + 100 * np.sin(6 * xx), 128 + 100 * np.cos(5 * yy), 255 * xx * yy], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, format="JPEG", quality=95)
    s = synthetic_samples(1, identities=1, seed=0, size=64, encoded=True)[0]
    meta = json.loads(s["json"])
    lm = ARCFACE_TEMPLATE * (size / 112 * 0.6) + size * 0.2  # an aligned face: eyes ~120 px apart
    meta["landmarks_aligned"] = lm.tolist()
    s = {**s, "face.jpg": buf.getvalue(), "json": json.dumps(meta).encode()}
    tar = tmp / "train" / "train-000000.tar"
    write_tar(tar, [encoded_members(s)])
    return tar, lm


def test_the_arcface_crop_of_a_reduced_face_decode_matches_the_full_size_one(tmp_path):
    from pipeline.shard_reader import SCALE_KEY, ShardIndex

    tar, _ = _smooth_face_tar(tmp_path)
    sizes = methods.get(M).phase("main").decode_sizes(None, 64)
    assert sizes.get("face.jpg", 0) >= 2 * F.CROP  # F2D's loader decodes its face at about twice the crop
    src = ShardIndex([str(tar)])
    full = src.get(0, ("face.jpg", "json"))
    small = src.get(0, ("face.jpg", "json"), sizes)
    assert SCALE_KEY not in full and small["face.jpg"].shape[:2] == (256, 256)
    assert small[SCALE_KEY] == {"face.jpg": 0.5}
    a, b = F.face_crop(full).astype(np.float32), F.face_crop(small).astype(np.float32)
    assert np.abs(a - b).mean() < 4.0
    # without the scale the 512 px landmarks would cut the wrong region of the 256 px decode
    off = F.face_crop({k: v for k, v in small.items() if k != SCALE_KEY}).astype(np.float32)
    assert np.abs(a - off).mean() > 20.0
