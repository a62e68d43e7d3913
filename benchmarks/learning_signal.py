"""Learning signal: does conditioning on identity A give images closer to A than to B?

No pretrained Stable Diffusion exists offline, so the demo's images are noise and every identity
score is honestly 0; that says nothing about whether a method's conditioning carries identity. This
benchmark, on the tiny preset (64 px):

1. pretrains the tiny model briefly on the shards' aligned faces (every face of both splits, 64 px,
   horizontal flips): first the tiny VAE as an autoencoder (a random VAE decodes nothing face-like),
   then the tiny UNet with the noise MSE (prompt "a photo of a face", 10% empty for guidance), and
   saves it as a diffusers folder that `train.base_model.path` loads;
2. trains every registered method (or `--methods`) for a fixed budget with the generic APIs
   (`training.train.train` per phase in order; a per-identity phase (`Phase.per_identity`) once per
   identity its `Phase.bind` accepts, the refusals (`DataVerdict`) recorded): `--method-steps`
   optimizer steps in all, split evenly over the phases (and identities), each run capped at its
   share of `--method-seconds` of wall time (a shared machine; the steps reached are recorded),
   every phase at one learning rate (`--lr`: the papers' rates are for SD-scale models and 1e5+
   steps) and the params.yaml batch sizes;
3. generates, per method, for every labelled identity A (its first face's conditioner inputs,
   `Method.inputs`; a per-identity method with A's own adapter) and `--seeds` seeds, at the method's
   inference lambda and at lambda 0 (the unconditioned baseline), 64 px;
4. scores with the real ArcFace (the shards' w600k_mbf, `pipeline.models.identity`) on the 64 px
   images resized to 112, no detection, against the references prepared the same way (each
   identity's aligned faces resized to 64 then 112, embeddings averaged): the margin
   sim(A_gen, A) - mean_B sim(A_gen, B), averaged over identities and seeds, with a bootstrap 95%
   interval over the (identity, seed) samples.

A method is "above baseline" only when the lower end of its interval is above the baseline margin;
otherwise it is reported as not above baseline. The budget is small (minutes on 2 CPU cores): a
negative result says the signal is not visible at this budget, not that the method cannot learn.

    python -m benchmarks.learning_signal --shards data/shards [--method-steps 200] [--unet-seconds 180]
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml

from benchmarks.common import machine, write_result

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a face"


# ============================================================================================
# data


def all_faces(shards: str, size: int = 64) -> list[np.ndarray]:
    """Every aligned face (face.jpg) of both splits, resized to `size` (uint8 (size, size, 3))."""
    from PIL import Image

    from pipeline.shard_reader import ShardIndex, shard_urls

    out = []
    for split in ("train", "val"):
        try:
            urls = shard_urls(shards, split)
        except ValueError:
            continue
        if not urls:
            continue
        index = ShardIndex(urls, ("face.jpg",))
        for i in range(len(index)):
            face = index.get(i, ("face.jpg",))["face.jpg"]
            if face.ndim == 2:
                face = np.stack([face] * 3, -1)
            out.append(np.asarray(Image.fromarray(np.ascontiguousarray(face[..., :3])).resize((size, size), Image.Resampling.BICUBIC)))
    return out


def identities(shards: str, needs: Sequence[str] = ()) -> dict[str, list]:
    """{identity: [EvalFace, ...]} of every labelled face of both splits holding `needs`."""
    from training.evaluate import labeled_faces

    out: dict[str, list] = {}
    for f in labeled_faces(shards, ("train", "val"), 10**6, 10**6, need=tuple(needs)):
        out.setdefault(f.identity, []).append(f)
    return out


# ============================================================================================
# 1. pretraining the tiny model on faces


def _batches(x: torch.Tensor, batch: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x) - batch + 1, batch):
            b = x[perm[s:s + batch]]
            flip = torch.rand(len(b), generator=gen) < 0.5
            b[flip] = b[flip].flip(-1)
            yield b


def pretrain(faces: Sequence[np.ndarray], out: Path, vae_seconds: float, unet_seconds: float, seed: int = 0) -> dict:
    """Train the tiny VAE (reconstruction + small KL), then the tiny UNet (noise MSE) on `faces`;
    save a diffusers folder at `out`. Returns what was done (steps, losses, seconds)."""
    import torch.nn.functional as F

    from pipeline.models.diffusion import build_random

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    comps = build_random("tiny", device="cpu")
    x = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    batch = min(16, len(x))
    rec: dict[str, Any] = {"faces": len(x), "batch": batch}

    vae = comps.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    t0, step, losses = time.perf_counter(), 0, []
    for b in _batches(x, min(8, batch), gen):  # full-resolution convolutions: the VAE step is the costly one
        post = vae.encode(b).latent_dist
        recon = vae.decode(post.sample(gen)).sample
        loss = F.mse_loss(recon, b) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        step += 1
        if step % 50 == 0:
            print(f"[pretrain vae] step {step} loss {np.mean(losses[-50:]):.4f} {time.perf_counter() - t0:.0f}s", flush=True)
        if time.perf_counter() - t0 > vae_seconds:
            break
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        scaling = float(1.0 / z.std())
        mse = float(F.mse_loss(vae.decode(z).sample, x))
    vae.register_to_config(scaling_factor=scaling)
    rec["vae"] = {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "loss_last50": float(np.mean(losses[-50:])),
                  "reconstruction_mse": mse, "scaling_factor": scaling, "lr": 2e-3, "batch": min(8, batch)}

    unet = comps.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    with torch.no_grad():
        text = comps.encode_prompt([PROMPT, ""])
        latents = vae.encode(x).latent_dist.mode() * scaling
        latents_flip = vae.encode(x.flip(-1)).latent_dist.mode() * scaling
    sched = comps.noise_scheduler
    t0, step, losses = time.perf_counter(), 0, []
    def index_batches():
        while True:
            perm = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x) - batch + 1, batch):
                yield perm[s:s + batch]

    for i in index_batches():
        flip = torch.rand(len(i), generator=gen) < 0.5
        z0 = torch.where(flip[:, None, None, None], latents_flip[i], latents[i])
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(i),), generator=gen)
        zt = sched.add_noise(z0, noise, t)
        empty = torch.rand(len(i), generator=gen) < 0.1
        cond = torch.where(empty[:, None, None], text[1:2].expand(len(i), -1, -1), text[0:1].expand(len(i), -1, -1))
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        step += 1
        if step % 50 == 0:
            print(f"[pretrain unet] step {step} loss {np.mean(losses[-50:]):.4f} {time.perf_counter() - t0:.0f}s", flush=True)
        if time.perf_counter() - t0 > unet_seconds:
            break
    comps.freeze()
    rec["unet"] = {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "loss_first50": float(np.mean(losses[:50])),
                   "loss_last50": float(np.mean(losses[-50:])), "lr": 1e-3, "prompt": PROMPT, "empty_prompt_p": 0.1}
    if out.exists():
        shutil.rmtree(out)
    comps.save_pretrained(out)
    return rec


# ============================================================================================
# 2. training every method for a fixed budget


def _time_cap(seconds: float):
    """Lightning callback: stop training once `seconds` of wall time have passed since the first step
    (a safety cap on a shared machine; the steps reached are recorded)."""
    from lightning.pytorch.callbacks import Callback

    class TimeCap(Callback):
        def __init__(self):
            self.t0: Optional[float] = None
            self.capped = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.t0 is None:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.t0 is not None and time.perf_counter() - self.t0 > seconds:
                trainer.should_stop = True
                self.capped = True

    return TimeCap()


def train_params(base: dict, work: Path, model: Path, shards: str, method: str, lr: float) -> dict:
    """The project's params with the pretrained base, the shards, outputs under `work`, no MLflow,
    one CPU thread, every phase of `method` at `lr`, no intermediate checkpoints or sample grids."""
    from training import methods

    p = copy.deepcopy(base)
    t = p["train"]
    t["base_model"] = {"path": str(model), "preset": None}
    t.update({"shards": str(shards), "synthetic": 0, "out_dir": str(work / "models"), "checkpoints_dir": str(work / "checkpoints"),
              "metrics_dir": str(work / "metrics"), "plots_dir": str(work / "plots"), "num_workers": 0, "threads": 1})
    t["mlflow"] = {**t.get("mlflow", {}), "enabled": False}
    mcfg = t["methods"].setdefault(method, {})
    for ph in methods.get(method).phases:
        c = mcfg.setdefault(ph, {})
        c.update({"lr": lr, "warmup_steps": 0, "sample_every": 0, "checkpoint_every": 100000, "log_every": 10})
    return p


def accepted(name: str, ph: Any, params: dict, idents: Sequence[str]) -> tuple[list[str], list[dict]]:
    """The identities a per-identity phase accepts (`Phase.bind`; a `DataVerdict` refuses one), and the refusals."""
    from training import methods
    from training.config import train_params as tparams
    from training.data import PersonaDataModule
    from training.methods.base import DataVerdict
    from training.personalize import identity_key

    m = methods.get(name)
    tp = tparams(params)
    dm = PersonaDataModule(m, ph, tp.train, tp.phase(name, ph.name))
    dm.load_sources()
    ok, refused = [], []
    for ident in idents:
        pcfg = tparams(params, {identity_key(m, ph): ident}).phase(name, ph.name)
        try:
            ph.bind(pcfg, dm.train_source)
            ok.append(ident)
        except DataVerdict as e:
            refused.append({"identity": ident, "refused": e.reason, "error": str(e)})
    return ok, refused


def train_method(name: str, base: dict, work: Path, model: Path, shards: str, steps: int, cap: float, lr: float,
                 idents: Sequence[str]) -> dict:
    """Train every phase of `name` for `steps` optimizer steps in all (split evenly over its phases,
    and over the accepted identities of a per-identity phase), each run capped at its share of `cap`
    seconds. Returns {"phases": [...], "adapters": {identity or "*": adapter folder}}."""
    from training import methods
    from training.personalize import identity_key
    from training.train import train

    m = methods.get(name)
    phases = list(m.phases.values())
    rec: dict[str, Any] = {"phases": [], "adapters": {}}
    params = train_params(base, work, model, shards, name, lr)
    for ph in phases:
        who, rows = (accepted(name, ph, params, idents) if ph.per_identity else ([None], []))
        n = max(1, len(who))
        per_run = max(1, steps // len(phases) // n)
        for ident in who:
            ov = {identity_key(m, ph): ident} if ident is not None else {}
            t0 = time.perf_counter()
            timecap = _time_cap(cap / len(phases) / n)
            res = train(params, name, ph.name, max_steps=per_run, overrides=ov, resume="never", callbacks=[timecap])
            row = {"identity": ident, "steps": res["global_step"], "planned_steps": per_run, "capped": timecap.capped,
                   "seconds": round(time.perf_counter() - t0, 1),
                   "losses": {k: v for k, v in (res.get("metrics") or {}).items() if k.startswith("loss")}}
            rec["adapters"][ident or "*"] = str(Path(res["adapter"]).parent)
            rows.append(row)
            print(f"[train {name}.{ph.name}] {row}", flush=True)
        rec["phases"].append({"phase": ph.name, "per_identity": ph.per_identity, "lr": lr, "runs": rows})
    return rec


# ============================================================================================
# 3-4. generation and the margin


def existing_adapters(name: str, work: Path) -> dict[str, str]:
    """{identity or "*": folder} of the adapters a previous run trained for `name` under `work` (its
    last phase's; a per-identity phase's per identity, from adapter.json `phase_record.identity`)."""
    from training import methods

    m = methods.get(name)
    last = list(m.phases.values())[-1]
    out = {}
    for meta_path in sorted((work / "models" / name).glob("*/adapter.json")):
        meta = json.loads(meta_path.read_text())
        if meta.get("phase") != last.name:
            continue
        key = (meta.get("phase_record") or {}).get("identity") if last.per_identity else "*"
        out[key or "*"] = str(meta_path.parent)
    return out


def embed64(arcface: Any, images: Sequence[np.ndarray]) -> np.ndarray:
    """ArcFace of (64, 64, 3) images resized to 112 (no detection, no alignment): (N, 512) unit rows."""
    from PIL import Image

    crops = [np.asarray(Image.fromarray(np.ascontiguousarray(im[..., :3])).resize((64, 64), Image.Resampling.BICUBIC)
                        .resize((112, 112), Image.Resampling.BICUBIC)) for im in images]
    return arcface.embed(crops)


def bootstrap(x: Sequence[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    a = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, len(a), (n, len(a)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def margins(gen_embs: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> list[float]:
    """Per generated image of identity A: cos(gen, A) - mean over B != A of cos(gen, B)."""
    out = []
    for a, embs in gen_embs.items():
        others = [b for b in refs if b != a]
        for e in embs:
            out.append(float(e @ refs[a] - np.mean([e @ refs[b] for b in others])))
    return out


def score_method(name: str, adapters: dict[str, str], faces: dict[str, list], refs: dict[str, np.ndarray], arcface: Any,
                 seeds: int, steps: int, guidance: float) -> dict:
    from training import methods
    from training.generate import Generator

    m = methods.get(name)
    per: dict[str, dict[str, np.ndarray]] = {"method": {}, "baseline": {}}
    scale = None
    loaded: dict[str, Any] = {}
    pixels: dict[str, dict[str, np.ndarray]] = {"method": {}, "baseline": {}}
    for ident in sorted(refs):
        folder = adapters.get(ident) or adapters.get("*")
        if folder is None or ident not in faces:
            continue
        gen = loaded.get(folder) or loaded.setdefault(folder, Generator.load(folder, device="cpu"))
        scale = gen.default_scale
        inputs = m.inputs([faces[ident][0].sample])
        prompt = m.prompt(PROMPT, gen.adapter)
        for key, lam in (("method", scale), ("baseline", 0.0)):
            imgs = gen.sample([[inputs]] * seeds, [prompt] * seeds, list(range(seeds)), scheduler="ddim", steps=steps,
                              guidance=guidance, scale=lam)
            per[key][ident] = embed64(arcface, list(imgs))
            pixels[key][ident] = np.asarray(imgs, np.float64)
    out: dict[str, Any] = {"lambda": scale, "identities": sorted(per["method"])}
    for key in ("method", "baseline"):
        ms = margins(per[key], refs) if len(refs) >= 2 else []
        out[key] = ({"margin": float(np.mean(ms)), "interval95": bootstrap(ms), "n": len(ms)} if ms
                    else {"margin": None, "interval95": None, "n": 0})
    # effect sizes (0-255 pixel units): how much the identity conditioning changes the image at all
    ids = sorted(pixels["method"])
    out["pixel_change_vs_lambda0"] = (float(np.mean([np.abs(pixels["method"][i] - pixels["baseline"][i]).mean() for i in ids]))
                                      if ids else None)
    pairs = [(a, b) for k, a in enumerate(ids) for b in ids[k + 1:]]
    out["pixel_spread_between_identities"] = (float(np.mean([np.abs(pixels["method"][a] - pixels["method"][b]).mean()
                                                             for a, b in pairs])) if pairs else None)
    mm, bm = out["method"], out["baseline"]
    out["above_baseline"] = bool(mm["margin"] is not None and bm["margin"] is not None and mm["interval95"][0] > bm["margin"])
    out["verdict"] = ("above baseline" if out["above_baseline"] else
                      "NOT above baseline (the margin's 95% interval reaches the unconditioned baseline)"
                      if mm["margin"] is not None else "not measured")
    return out


# ============================================================================================


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "_work" / "learning_signal"))
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument("--vae-seconds", type=float, default=120.0)
    ap.add_argument("--unet-seconds", type=float, default=180.0)
    ap.add_argument("--method-steps", type=int, default=200, help="optimizer steps per method (all phases)")
    ap.add_argument("--method-seconds", type=float, default=150.0, help="wall-time cap per method's training")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--reuse", default=None, metavar="RESULT_JSON",
                    help="rescore the base model and adapters a previous run left in --work (its result file)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no oversubscription on a shared machine)")
    args = ap.parse_args(argv)
    args.reuse_seconds = None

    from pipeline.config import Params
    from training import methods
    from training.evaluate import FaceScorer

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.params).read_text())
    names = args.methods.split(",") if args.methods else methods.names()
    faces64 = all_faces(args.shards)
    print(f"[learning_signal] {len(faces64)} aligned faces; methods {names}", flush=True)

    model = work / "base_model"
    previous = {}
    if args.reuse and (model / "model_index.json").is_file():  # rescore: the base model and adapters of a run
        previous = json.loads(Path(args.reuse).read_text())
        pre = previous["protocol"]["pretraining"]
        args.reuse_seconds = (previous.get("rescored") or {}).get("training_run_seconds_total") or previous.get("seconds_total")
    else:
        pre = pretrain(faces64, model, args.vae_seconds, args.unet_seconds)
    print(f"[learning_signal] pretrained: {json.dumps(pre)}", flush=True)

    scorer = FaceScorer.load(Params())
    arcface = scorer.arcface
    from PIL import Image

    everyone = identities(args.shards)
    refs = {}
    for ident, fs in everyone.items():
        e = embed64(arcface, [np.asarray(Image.fromarray(f.face).resize((64, 64), Image.Resampling.BICUBIC)) for f in fs])
        v = e.mean(0)
        refs[ident] = v / np.linalg.norm(v)
    ref_sims = {a: {b: float(refs[a] @ refs[b]) for b in refs} for a in refs}

    results: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        mw = work / name
        try:
            faces = identities(args.shards, methods.get(name).needs)
            old = (previous.get("methods") or {}).get(name) or {}
            if previous and "training" in old:
                trained = {"phases": old["training"], "adapters": existing_adapters(name, mw)}
            else:
                shutil.rmtree(mw, ignore_errors=True)
                trained = train_method(name, base, mw, model, args.shards, args.method_steps, args.method_seconds,
                                       args.lr, sorted(faces))
            scored = score_method(name, trained["adapters"], faces, {k: refs[k] for k in faces if k in refs}, arcface,
                                  args.seeds, args.steps, args.guidance)
            results[name] = {**scored, "training": trained["phases"], "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # one method's failure is its result, not the benchmark's
            results[name] = {"error": f"{type(e).__name__}: {e}", "seconds": round(time.perf_counter() - t0, 1)}
        print(f"[learning_signal] {name}: {json.dumps({k: v for k, v in results[name].items() if k != 'training'})}",
              flush=True)
        # keep the partial result on disk after every method
        write_result("learning_signal", _result(args, pre, refs, ref_sims, results, t_all, partial=name != names[-1]))
    scorer.close()
    res = _result(args, pre, refs, ref_sims, results, t_all, partial=False)
    write_result("learning_signal", res)
    print(f"{'method':18s} {'lambda':>6s} {'margin':>8s} {'95% interval':>20s} {'baseline':>9s}  verdict")
    for n, r in results.items():
        if "method" in r and r["method"]["margin"] is not None:
            lo, hi = r["method"]["interval95"]
            print(f"{n:18s} {r['lambda']:6.2f} {r['method']['margin']:8.4f} {f'[{lo:.4f}, {hi:.4f}]':>20s} "
                  f"{r['baseline']['margin']:9.4f}  {r['verdict']}")
        else:
            print(f"{n:18s} {r.get('error') or 'not measured'}")
    return 0


def _result(args, pre, refs, ref_sims, results, t_all, partial: bool) -> dict:
    return {
        "benchmark": "learning_signal", "machine": machine(), "partial": partial,
        "question": "does conditioning on identity A give 64 px images closer (ArcFace) to A than to B?",
        "protocol": {
            "base_model": "tiny preset (random init) pretrained here on the shards' aligned faces (VAE, then UNet); "
                          "NOT Stable Diffusion",
            "pretraining": pre, "budget_per_method": {"optimizer_steps": args.method_steps, "wall_cap_seconds": args.method_seconds},
            "lr_every_phase": args.lr,
            "generation": {"prompt": PROMPT, "seeds": args.seeds, "steps": args.steps, "scheduler": "ddim",
                           "guidance": args.guidance, "size": 64, "lambda": "each method's inference default; baseline 0"},
            "scoring": "ArcFace w600k_mbf (real, the identity stage's) on 64 px images resized to 112, no detection; "
                       "references: each identity's aligned faces at 64 px resized to 112, mean embedding; "
                       "margin = cos(gen_A, A) - mean_B cos(gen_A, B) per image, averaged; bootstrap 95% over images",
            "identities": sorted(refs), "reference_similarity": ref_sims,
            "effect_sizes": "pixel_change_vs_lambda0: mean |image(lambda) - image(0)|; pixel_spread_between_identities: "
                            "mean |image(A) - image(B)| at lambda, same seed (0-255 units)",
            "note": "a small CPU budget (minutes per method on a shared 2-core machine): a margin not above the "
                    "baseline means no measurable signal at this budget, not that the method cannot learn",
        },
        "methods": results,
        "seconds_total": round(time.perf_counter() - t_all, 1),
        **({"rescored": {"note": "this run rescored (with --reuse) the base model and adapters of the run below; "
                                 "pretraining and training figures are that run's",
                         "training_run_seconds_total": args.reuse_seconds}} if args.reuse_seconds is not None else {}),
    }


if __name__ == "__main__":
    sys.exit(main())
