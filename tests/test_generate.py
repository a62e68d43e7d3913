"""Generation through a diffusers pipeline with a tiny trained W+ adapter: schedulers, CFG, lambda,
delay, edits; scale 0 is the base pipeline; records re-run identically."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import Params
from pipeline.images import decode_image
from pipeline.digests import sha256_file
from training.generate import GenerateConfig, Generator, Request, generate, parse_models_uri, resolve_adapter
from training.methods.base import Identity
from training.methods.wplus import apply_edit, load_direction

STEPS = 4


def make_tiny_adapter(folder: Path, *, steps: int = 2, seed: int = 0, lr: float = 1e-3,
                      mlflow: dict | None = None, phase: str = "stage2") -> Path:
    """Train the tiny W+ adapter a few noise-MSE steps and write the training output contract
    (adapter.safetensors + adapter.json) into `folder`."""
    from pipeline.models.diffusion import build_random
    from training import methods
    from training.adapter import PersonaAdapter, save_adapter
    from training.losses import noise_mse

    folder = Path(folder)
    m = methods.get("wplus")
    comps = build_random("tiny", device="cpu").freeze()
    torch.manual_seed(seed)
    base = {"preset": "tiny", "path": None}
    adapter = PersonaAdapter("wplus", m.conditioner(**m.conditioner_config(m.config(), comps)), m.injection(),
                             phase=phase, base_model=base).install(comps)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    text = comps.encode_prompt(["a face", "a photo of a face"])
    for _ in range(steps):
        z = comps.encode_images(torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, generator=g)
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        w = torch.randn(2, 18, 512, generator=g)
        with adapter.injection.conditioned(adapter.tokens({"wplus": w})):
            loss = noise_mse(comps.unet(comps.noise_scheduler.add_noise(z, noise, t), t, encoder_hidden_states=text).sample, noise)
            opt.zero_grad()
            loss.backward()
        opt.step()
    save_adapter(adapter, folder / "adapter.safetensors")
    meta = {
        "method": "wplus", "phase": phase, "base_model": base,
        "conditioner": adapter.conditioner.config(), "scale": 1.0,
        "mlflow": mlflow or {"tracking_uri": None, "run_id": None, "experiment": None},
        "lineage": {"git_commit": "test", "shards_hash": "test-shards"},
        "weights_real": {k: False for k in ("unet", "vae", "text_encoder")}, "global_step": steps, "seed": seed,
    }
    (folder / "adapter.json").write_text(json.dumps(meta, indent=2))
    return folder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to a busy machine (2 threads on 2
    shared cores stall on every op)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return make_tiny_adapter(tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def gen(adapter_dir) -> Generator:
    return Generator.load(str(adapter_dir), device="cpu", dtype="fp32")


def _w(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((18, 512)).astype(np.float32)


def test_sample_lambda_delay_guidance_and_seed_semantics(gen):
    w1, w2 = _w(1), _w(2)
    kw = dict(steps=STEPS, guidance=5.0)

    def s(w, seed=0, **k):
        return gen.sample([[{"wplus": w}]], ["a photo of a face"], [seed], **{**kw, **k})[0]

    a = s(w1)
    assert a.shape == (gen.native_size, gen.native_size, 3) and a.dtype == np.uint8 and gen.native_size == 64
    assert np.array_equal(a, s(w1)), "same inputs must give the same pixels"
    assert not np.array_equal(a, s(w1, seed=1)), "the seed must matter"
    assert not np.array_equal(a, s(w2)), "the W+ code must matter at lambda 1"
    assert np.array_equal(s(w1, scale=0.0), s(w2, scale=0.0)), "lambda 0 ignores the identity"
    # delaying the identity for all steps == lambda 0; for some steps it changes the image
    assert np.array_equal(s(w1, delay_steps=STEPS), s(w2, scale=0.0))
    assert not np.array_equal(s(w1, delay_steps=2), a)
    assert not np.array_equal(s(w1, guidance=1.0), a), "guidance must matter"
    # batching does not change the noise: a batch of two equals the two single images up to float noise
    both = gen.sample([[{"wplus": w1}], [{"wplus": w2}]], ["a photo of a face"] * 2, [0, 0], **kw)
    assert np.abs(both[0].astype(int) - a.astype(int)).max() <= 2


def test_schedulers_and_scale_zero_is_the_base_pipeline(gen):
    """Any diffusers scheduler runs (repeatably); at lambda 0 the images are the base pipeline's,
    pixel for pixel (a pipeline built from the same base model with no adapter)."""
    from pipeline.models.diffusion import build_random
    from training.sampling import make_pipeline, sample

    base = make_pipeline(build_random("tiny", device="cpu").freeze())
    w = _w(4)
    for sched in ("ddim", "euler_a", "dpm++"):
        kw = dict(scheduler=sched, steps=STEPS, guidance=5.0)
        img = gen.sample([[{"wplus": w}]], ["a face"], [3], **kw)[0]
        assert np.array_equal(img, gen.sample([[{"wplus": w}]], ["a face"], [3], **kw)[0]), sched
        plain = sample(base, None, None, ["a face"], [3], **kw)[0]
        assert np.array_equal(gen.sample([[{"wplus": w}]], ["a face"], [3], scale=0.0, **kw)[0], plain), sched
        assert not np.array_equal(img, plain), sched
        assert type(gen.pipe.scheduler).__name__ == {"ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                                                      "dpm++": "DPMSolverMultistepScheduler"}[sched]
    ddim = gen.sample([[{"wplus": w}]], ["a face"], [3], steps=STEPS)[0]
    assert not np.array_equal(ddim, gen.sample([[{"wplus": w}]], ["a face"], [3], scheduler="euler_a", steps=STEPS)[0])
    # the identity scale also reaches the processors through diffusers' cross_attention_kwargs
    gen.adapter.condition([[{"wplus": w}]])
    try:
        lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        text = gen.comps.encode_prompt(["", "a face"])
        t = torch.tensor([500, 500])
        via_kwargs = gen.comps.unet(lat, t, text, cross_attention_kwargs={"identity_scale": 0.0}).sample
        gen.adapter.scale = 0.0
        via_handle = gen.comps.unet(lat, t, text).sample
    finally:
        gen.adapter.scale = 1.0
        gen.adapter.clear()
    assert torch.equal(via_kwargs, via_handle) and torch.equal(via_handle, base.unet(lat, t, text).sample)


def test_generate_writes_records_and_from_json_reproduces_pixels(adapter_dir, tmp_path, capsys):
    wfile = tmp_path / "code.npy"
    np.save(wfile, _w(7))
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    params.write_text("generate:\n  steps: 3\n  guidance: 4.0\n")
    rc = main(["generate", "--adapter", str(adapter_dir), "--input", f"wplus={wfile}", "--prompt", "a photo of a face",
               "--prompt", "a face on the moon", "--seed", "5", "--lambda", "0.8", "--delay", "1",
               "--scheduler", "euler_a", "--device", "cpu", "--out", str(out), "--params", str(params)])
    assert rc == 0
    recs = sorted(out.glob("*.json"))
    assert [p.name for p in recs] == ["img-p00-seed5.json", "img-p01-seed5.json"]
    rec = json.loads(recs[1].read_text())
    assert rec["prompt"] == "a face on the moon" and rec["seed"] == 5 and rec["steps"] == 3
    assert rec["guidance"] == 4.0 and rec["lambda"] == 0.8 and rec["delay_steps"] == 1 and rec["method"] == "wplus"
    assert rec["scheduler"]["name"] == "euler_a" and rec["scheduler"]["class"] == "EulerAncestralDiscreteScheduler"
    assert rec["adapter"]["sha256"] == sha256_file(adapter_dir / "adapter.safetensors")
    assert rec["adapter"]["path"] == str(adapter_dir.resolve())
    assert rec["base_model"]["preset"] == "tiny" and rec["weights_real"]["base.unet"] is False and "warning" in rec
    assert rec["versions"]["torch"] and rec["versions"]["diffusers"]
    assert rec["image"]["sha256"] == sha256_file(out / rec["image"]["file"])
    (cond,) = rec["conditioning"]
    assert cond["source"] == {"kind": "file", "path": str(wfile), "sha256": sha256_file(wfile)} and "edit" not in cond
    np.testing.assert_array_equal(np.load(out / cond["inputs"]["wplus"]["file"]), _w(7))
    original = decode_image((out / rec["image"]["file"]).read_bytes())

    rerun = tmp_path / "rerun"
    assert main(["generate", "--from-json", str(recs[1]), "--out", str(rerun), "--check", "--device", "cpu"]) == 0
    again = decode_image((rerun / rec["image"]["file"]).read_bytes())
    np.testing.assert_array_equal(again, original)
    assert json.loads((rerun / recs[1].name).read_text())["regenerated_from"]["identical"] is True

    # a record whose conditioner input was tampered with is refused
    np.save(out / cond["inputs"]["wplus"]["file"], _w(8))
    assert main(["generate", "--from-json", str(recs[1]), "--out", str(rerun)]) == 1
    assert "sha256 differs from the record" in capsys.readouterr().err


def test_edit_direction_is_applied_and_recorded(gen, tmp_path):
    d512 = np.linspace(-1, 1, 512, dtype=np.float32)
    np.save(tmp_path / "d.npy", d512)
    d = load_direction(str(tmp_path / "d.npy"))
    assert d.shape == (18, 512) and np.array_equal(d[5], d512)
    np.save(tmp_path / "bad.npy", np.zeros((3, 512), np.float32))
    with pytest.raises(ValueError, match="direction"):
        load_direction(str(tmp_path / "bad.npy"))
    w = _w(3)
    np.testing.assert_allclose(apply_edit(w, d, 2.0), w + 2.0 * d, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(apply_edit(w, d, 0.0), w)

    np.save(tmp_path / "w.npy", w)
    cfg = GenerateConfig(steps=2, guidance=3.0, device="cpu")
    files = {"wplus": str(tmp_path / "w.npy"), "edit": str(tmp_path / "d.npy")}
    rec = generate(Request(prompts=["a face"], inputs=files, options={"alpha": "2"}), cfg, generator=gen,
                   out=tmp_path / "o")[0]
    (cond,) = rec["conditioning"]
    assert cond["edit"] == {"direction": str(tmp_path / "d.npy"), "sha256": sha256_file(tmp_path / "d.npy"), "alpha": 2.0}
    np.testing.assert_allclose(np.load(tmp_path / "o" / cond["inputs"]["wplus"]["file"]), w + 2.0 * d, atol=1e-6)
    plain = generate(Request(prompts=["a face"], inputs={"wplus": files["wplus"]}, name="plain"), cfg, generator=gen,
                     out=tmp_path / "o")[0]
    assert plain["image"]["sha256"] != rec["image"]["sha256"], "the edit must change the image"
    with pytest.raises(ValueError, match="go together"):
        generate(Request(prompts=["a face"], inputs=files), cfg, generator=gen, out=tmp_path / "o")


def test_reference_photos_are_aligned_encoded_and_mixed(sample_raw, gen, tmp_path):
    from training.references import ReferenceKit

    photos = [str(sample_raw / "sample" / "obama" / n) for n in ("obama.jpg", "obama2.jpg")]
    kit = ReferenceKit(Params(), device="cpu")
    try:
        samples = kit.samples(photos, gen.method.needs)
        assert [s["face.jpg"].shape for s in samples] == [(512, 512, 3)] * 2
        w_a, w_b = (gen.method.inputs([s])["wplus"] for s in samples)
        w = gen.method.inputs(samples)["wplus"]
        np.testing.assert_allclose(w, (w_a + w_b) / 2, atol=1e-4)
        np.testing.assert_allclose(gen.method.inputs(samples, [3, 1])["wplus"], 0.75 * w_a + 0.25 * w_b, atol=1e-4)
        assert w.shape == (18, 512) and w.dtype == np.float32
        refs = kit.records(photos)
        assert [r["sha256"] for r in refs] == [sha256_file(p) for p in photos]
        assert all(r["face"]["mask_source"] == "mesh" and r["face"]["quad_side"] > 64 for r in refs)
        rec = generate(Request(prompts=["a photo of a face"], identities=[Identity([photos[0]])]),
                       GenerateConfig(steps=2, device="cpu"), generator=gen, kit=kit, out=tmp_path)[0]
    finally:
        kit.close()
    (cond,) = rec["conditioning"]
    assert cond["source"]["kind"] == "references"
    assert cond["source"]["models"]["e4e"]["weights_real"] is False  # random e4e here, said in the record
    assert [r["sha256"] for r in cond["references"]] == [sha256_file(photos[0])]
    np.testing.assert_allclose(np.load(tmp_path / cond["inputs"]["wplus"]["file"]), w_a, atol=1e-6)


def test_adapter_resolution_errors(adapter_dir, tmp_path, capsys):
    assert parse_models_uri("models:/persona-wplus@champion") == ("persona-wplus", None, "champion")
    assert parse_models_uri("models:/persona-wplus/3") == ("persona-wplus", "3", None)
    for bad in ("models:/x", "models:/@a", "runs:/x/adapter"):
        with pytest.raises(ValueError):
            parse_models_uri(bad)
    with pytest.raises(RuntimeError, match="sha256"):
        resolve_adapter(str(adapter_dir), expect_sha256="0" * 64)
    (tmp_path / "adapter.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="adapter.json"):
        resolve_adapter(str(tmp_path))
    # W+ needs reference photos or a code: a clear one-line error
    assert main(["generate", "--adapter", str(adapter_dir), "--prompt", "x", "--device", "cpu"]) == 1
    assert "give reference photo(s) or --input wplus=CODE.npy" in capsys.readouterr().err


def test_image_to_image_from_a_content_photo_is_generic_and_reruns(sample_raw, adapter_dir, tmp_path, capsys):
    """--content / --strength with any method (here W+ with its own input): img2img from the same
    components, the output keeps the photo's aspect, strength matters, the record re-runs."""
    wfile = tmp_path / "code.npy"
    np.save(wfile, _w(3))
    photo = sample_raw / "unlabeled" / "gdp.jpg"  # portrait 500 x 665
    base = ["generate", "--adapter", str(adapter_dir), "--input", f"wplus={wfile}", "--content", str(photo),
            "--prompt", "a face", "--steps", "4", "--scheduler", "dpm++", "--device", "cpu", "--out", str(tmp_path)]
    assert main([*base, "--strength", "0.5", "--name", "half"]) == 0
    assert main([*base, "--strength", "1.0", "--name", "full"]) == 0
    half, full = (json.loads((tmp_path / f"{n}-p00-seed0.json").read_text()) for n in ("half", "full"))
    assert (half["image"]["height"], half["image"]["width"]) == (88, 64)
    c = half["content"]
    assert c["strength"] == 0.5 and c["photo_sha256"] == sha256_file(photo) and "instances" not in c
    assert decode_image((tmp_path / c["file"]).read_bytes()).shape == (88, 64, 3)
    assert half["image"]["sha256"] != full["image"]["sha256"]
    assert main(["generate", "--from-json", str(tmp_path / "half-p00-seed0.json"), "--check"]) == 0
    assert "IDENTICAL" in capsys.readouterr().out
    # --assign needs several identities; --mix is --weights; a flag neither generate nor the method declares is refused
    with pytest.raises(SystemExit, match="--assign goes with --content and several --ref"):
        main([*base, "--assign", "1"])
    with pytest.raises(SystemExit, match=r"unrecognized arguments: --frobnicate 3 \(the flags of method 'wplus': none\)"):
        main([*base, "--frobnicate", "3"])
