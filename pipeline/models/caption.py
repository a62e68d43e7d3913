"""BLIP-2 captions of in-the-wild crops: `load(cfg) -> Captioner`, `captioner.caption(images)`.

Backends (`caption.backend`):
- `transformers`: `Blip2ForConditionalGeneration` + `Blip2Processor` from a LOCAL folder
  (`caption.model_path`, e.g. a snapshot of Salesforce/blip2-opt-2.7b); never downloads. fp16 on
  GPU, fp32 on CPU. `auto` (the default) picks it whenever `model_path` is set.
- `lavis`: salesforce-lavis `blip2_opt`, which cannot live in the main environment. It runs in a
  separate Python (`caption.lavis_python`) as `lavis_worker.py`, fed over stdin/stdout with
  JSON lines; this module never imports lavis.
- `none`: no captions (empty strings); `info.name == "none"`, `weights_real=False`.

Images everywhere are (H, W, 3) uint8 RGB arrays; captions are plain str, one per image.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.config import CaptionConfig
from pipeline.models import lavis_worker as proto
from pipeline.models.base import ModelInfo, announce, file_fingerprint, text_fingerprint

log = logging.getLogger("persona.models.caption")

# Salesforce BLIP-2 weights are MIT; the OPT language model inside them is under Meta's OPT license.
LICENSE = "MIT (Salesforce BLIP-2); language model under the OPT-2.7b license (non-commercial research)"
LAVIS_WORKER = Path(__file__).with_name("lavis_worker.py")
_FULL_HASH_MAX = 256 << 20  # files up to this size are hashed whole
_EDGE = 8 << 20  # bytes hashed at each end of larger weight files


class CaptionError(RuntimeError):
    """A caption backend that cannot be loaded or run, with what to fix."""


def resolve_backend(cfg: CaptionConfig) -> str:
    """`auto` -> `transformers` when model_path is set, else `none`; others as given."""
    if cfg.backend == "auto":
        return "transformers" if cfg.model_path else "none"
    return cfg.backend


def _check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = list(images)
    for i, im in enumerate(out):
        if not isinstance(im, np.ndarray) or im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            shape = getattr(im, "shape", None)
            raise CaptionError(f"image {i}: expected (H, W, 3) uint8 RGB, got {shape} {getattr(im, 'dtype', type(im))}")
    return out


def _batches(items: list, size: int):
    size = max(1, int(size))
    for s in range(0, len(items), size):
        yield items[s:s + size]


class Captioner:
    """Base: `caption(images) -> list[str]` and `info`; `close()` frees the backend."""

    backend = "none"
    info: ModelInfo

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Captioner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# none


class NoneCaptioner(Captioner):
    """Writes no captions: every image gets "" and the metadata says caption backend none."""

    backend = "none"

    def __init__(self) -> None:
        self.info = ModelInfo(name="none", fingerprint=text_fingerprint("caption-none"), weights_real=False,
                              license="n/a", source="")
        log.warning("caption backend 'none': NO captions are produced (empty strings); set caption.model_path "
                    "to a local BLIP-2 folder to caption")

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        return [""] * len(_check_images(images))


# --------------------------------------------------------------------------------------------
# transformers


def folder_fingerprint(path: str | os.PathLike, length: int = 16) -> str:
    """Content fingerprint of a HF model folder: config, tokenizer and processor files hashed whole;
    weight files whole up to 256 MiB, above that their size plus the first and last 8 MiB (fast,
    and identifies a download; a bit flip in the middle of a huge file would go unnoticed)."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(root).as_posix()
        if f.suffix not in (".json", ".safetensors", ".bin", ".model", ".txt", ".pt", ".pth"):
            continue
        size = f.stat().st_size
        h.update(f"{rel}\x00{size}\x00".encode())
        if size <= _FULL_HASH_MAX:
            h.update(file_fingerprint(f, 64).encode())
        else:
            with open(f, "rb") as fh:
                h.update(fh.read(_EDGE))
                fh.seek(size - _EDGE)
                h.update(fh.read(_EDGE))
    return h.hexdigest()[:length]


class TransformersCaptioner(Captioner):
    """BLIP-2 from a local Hugging Face folder (config.json, weights, processor + tokenizer files)."""

    backend = "transformers"

    def __init__(self, cfg: CaptionConfig, device: Optional[str] = None):
        if not cfg.model_path:
            raise CaptionError("caption.backend=transformers needs caption.model_path: a local BLIP-2 folder "
                               "(e.g. a snapshot of Salesforce/blip2-opt-2.7b); nothing is downloaded")
        root = Path(cfg.model_path).expanduser()
        if not root.is_dir():
            raise CaptionError(f"caption.model_path={str(root)!r} is not a folder: expected a local BLIP-2 model "
                               "folder with config.json, model weights and processor/tokenizer files")
        if not (root / "config.json").is_file():
            raise CaptionError(f"caption.model_path={str(root)!r} has no config.json: not a Hugging Face model folder")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch  # noqa: PLC0415
        from transformers import Blip2ForConditionalGeneration, Blip2Processor  # noqa: PLC0415

        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = Blip2Processor.from_pretrained(str(root), local_files_only=True)
            self.model = Blip2ForConditionalGeneration.from_pretrained(
                str(root), local_files_only=True, dtype=self.dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise CaptionError(f"cannot load BLIP-2 from {root}: {e}") from e
        mcfg = self.model.config
        if self.processor.num_query_tokens is None:  # folders saved before processors knew it
            self.processor.num_query_tokens = mcfg.num_query_tokens
        if mcfg.image_token_index is None:
            raise CaptionError(f"{root}/config.json has no image_token_index: re-save the folder with a current "
                               "transformers (the model needs an <image> token in its vocabulary)")
        self._torch = torch
        self.info = ModelInfo(name=f"blip2-transformers:{root.name}", fingerprint=folder_fingerprint(root),
                              weights_real=True, license=LICENSE, source=str(root))
        announce(self.info)

    def _inputs(self, images: list[np.ndarray]) -> dict:
        torch = self._torch
        n = len(images)
        if self.cfg.prompt:
            enc = self.processor(images=images, text=[self.cfg.prompt] * n, return_tensors="pt")
        else:
            # what BLIP-2 does without a prompt: the query-token placeholders followed by BOS
            enc = self.processor(images=images, return_tensors="pt")
            mcfg = self.model.config
            ids = [mcfg.image_token_index] * mcfg.num_query_tokens + [mcfg.text_config.bos_token_id]
            enc["input_ids"] = torch.tensor([ids] * n, dtype=torch.long)
            enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        out = {k: v.to(self.device) for k, v in enc.items()}
        out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        """(H, W, 3) uint8 RGB images -> one caption each (greedy/beam search, deterministic)."""
        images = _check_images(images)
        captions: list[str] = []
        for chunk in _batches(images, self.cfg.batch_size):
            inputs = self._inputs(chunk)
            with self._torch.inference_mode():
                # pass the folder's generation_config.json explicitly: BLIP-2 hands generation to its
                # inner language model, which would otherwise use defaults derived from text_config
                out = self.model.generate(**inputs, generation_config=self.model.generation_config,
                                          max_new_tokens=self.cfg.max_new_tokens, num_beams=self.cfg.num_beams,
                                          do_sample=False)
            prefix = inputs["input_ids"].shape[1]
            if out.shape[1] >= prefix and bool((out[:, :prefix] == inputs["input_ids"]).all()):
                out = out[:, prefix:]  # decoder-only LMs return the prompt too
            captions += [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        return captions

    def close(self) -> None:
        self.model = None


# --------------------------------------------------------------------------------------------
# lavis (separate environment)


def _resolve_python(py: Optional[str]) -> str:
    if not py:
        raise CaptionError(
            "caption.backend=lavis needs caption.lavis_python: the python executable of a SEPARATE environment "
            "with salesforce-lavis installed (it cannot be installed beside the main environment: DESIGN.md "
            "section 4). Or use caption.backend=transformers with a local BLIP-2 folder.")
    path = shutil.which(py) if os.sep not in py else py
    if not path or not Path(path).is_file() or not os.access(path, os.X_OK):
        raise CaptionError(f"caption.lavis_python={py!r} is not an executable python")
    return str(path)


class LavisCaptioner(Captioner):
    """Captions through `lavis_worker.py` running under `cfg.lavis_python` (one process per captioner)."""

    backend = "lavis"

    def __init__(self, cfg: CaptionConfig, device: Optional[str] = None):
        self.cfg = cfg
        self._proc: Optional[subprocess.Popen] = None
        python = _resolve_python(cfg.lavis_python)
        if cfg.model_path and not Path(cfg.model_path).expanduser().is_file():
            raise CaptionError(f"caption.model_path={cfg.model_path!r}: LAVIS checkpoint file not found")
        cmd = [python, "-I", str(LAVIS_WORKER), "--name", cfg.lavis_model_name,
               "--model-type", cfg.lavis_model_type, "--device", device or "auto",
               "--max-new-tokens", str(cfg.max_new_tokens), "--num-beams", str(cfg.num_beams)]
        if cfg.model_path:
            cmd += ["--checkpoint", str(Path(cfg.model_path).expanduser())]
        if cfg.prompt:
            cmd += ["--prompt", cfg.prompt]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, encoding="utf-8", bufsize=1, env=env)
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._pump, args=(self._proc.stdout,), daemon=True).start()
        self._next_id = 0
        msg = self._read("start")
        if not msg.get("ready"):
            self.close()
            raise CaptionError(f"LAVIS worker ({python}) did not start: {msg.get('error', msg)}")
        winfo = msg.get("info", {})
        self.worker_info = winfo
        fp = (file_fingerprint(cfg.model_path) if cfg.model_path else
              text_fingerprint("lavis", cfg.lavis_model_name, cfg.lavis_model_type, winfo.get("lavis_version")))
        self.info = ModelInfo(name=f"blip2-lavis:{cfg.lavis_model_name}/{cfg.lavis_model_type}", fingerprint=fp,
                              weights_real=True, license=LICENSE,
                              source=cfg.model_path or f"lavis:{cfg.lavis_model_type}")
        announce(self.info)

    def _pump(self, stream) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _stderr_tail(self, n: int = 4000) -> str:
        try:
            self._stderr.flush()
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - n))
            return self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def _read(self, what: str) -> dict:
        while True:
            try:
                line = self._lines.get(timeout=self.cfg.lavis_timeout_s)
            except queue.Empty:
                self.close()
                raise CaptionError(f"LAVIS worker gave no answer ({what}) within {self.cfg.lavis_timeout_s:.0f} s; "
                                   f"stderr tail:\n{self._stderr_tail()}") from None
            if line is None:
                rc = self._proc.wait() if self._proc else None
                raise CaptionError(f"LAVIS worker exited (code {rc}) during {what}; stderr tail:\n{self._stderr_tail()}")
            try:
                return proto.decode_message(line)
            except ValueError:
                log.debug("lavis worker stdout: %s", line.rstrip())

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        """(H, W, 3) uint8 RGB images -> one caption each, computed in the LAVIS environment."""
        images = _check_images(images)
        if self._proc is None or self._proc.poll() is not None:
            raise CaptionError("LAVIS worker is not running")
        captions: list[str] = []
        for chunk in _batches(images, self.cfg.batch_size):
            self._next_id += 1
            try:
                self._proc.stdin.write(proto.encode_request(self._next_id, chunk))
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError) as e:
                raise CaptionError(f"LAVIS worker pipe closed ({e}); stderr tail:\n{self._stderr_tail()}") from e
            msg = self._read(f"request {self._next_id}")
            if msg.get("id") != self._next_id:
                raise CaptionError(f"LAVIS worker answered request {msg.get('id')}, expected {self._next_id}")
            if "error" in msg:
                raise CaptionError(f"LAVIS worker failed: {msg['error']}")
            if len(msg["captions"]) != len(chunk):
                raise CaptionError(f"LAVIS worker returned {len(msg['captions'])} captions for {len(chunk)} images")
            captions += msg["captions"]
        return captions

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.stdin.write(proto.encode_shutdown())
                proc.stdin.flush()
                proc.stdin.close()
                proc.wait(timeout=30)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------


def load(cfg: CaptionConfig, device: Optional[str] = None) -> Captioner:
    """Captioner for cfg (see module doc). device: "cuda"/"cpu"; default CUDA when torch sees one."""
    backend = resolve_backend(cfg)
    if backend == "none":
        return NoneCaptioner()
    if backend == "transformers":
        return TransformersCaptioner(cfg, device)
    if backend == "lavis":
        return LavisCaptioner(cfg, device)
    raise CaptionError(f"unknown caption.backend {cfg.backend!r}")


def model_info(cfg: CaptionConfig) -> ModelInfo:
    """What `load(cfg)` will report, without loading the model (for cache keys in the driver)."""
    backend = resolve_backend(cfg)
    if backend == "none":
        return ModelInfo(name="none", fingerprint=text_fingerprint("caption-none"), weights_real=False,
                         license="n/a", source="")
    if backend == "transformers":
        root = Path(str(cfg.model_path)).expanduser()
        if not (root / "config.json").exists():
            raise CaptionError(f"caption.model_path {root} is not a BLIP-2 folder (no config.json)")
        return ModelInfo(name=f"blip2-transformers:{root.name}", fingerprint=folder_fingerprint(root),
                         weights_real=True, license=LICENSE, source=str(root))
    fp = (file_fingerprint(cfg.model_path) if cfg.model_path else
          text_fingerprint("lavis", cfg.lavis_model_name, cfg.lavis_model_type))
    return ModelInfo(name=f"blip2-lavis:{cfg.lavis_model_name}/{cfg.lavis_model_type}", fingerprint=fp,
                     weights_real=True, license=LICENSE, source=cfg.model_path or f"lavis:{cfg.lavis_model_type}")
