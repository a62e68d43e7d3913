"""BLIP-2 captioning with salesforce-lavis, run in a SEPARATE Python environment.

salesforce-lavis pins transformers 4.26 and a protobuf that break the main environment (DESIGN.md
section 4), so `pipeline.models.caption` starts this file as a script with `caption.lavis_python`:

    <lavis_python> lavis_worker.py --name blip2_opt --model-type caption_coco_opt2.7b [--checkpoint P]

Weights: without --checkpoint, LAVIS loads `model_type`'s fine-tuned weights from its cache (it
downloads them when online). With --checkpoint the architecture is built with fine-tuned loading
off and the local file is loaded. Either way LAVIS still needs the EVA ViT-g weights in its cache
and the OPT language model (`facebook/opt-2.7b`) in the Hugging Face cache of that environment;
the parent sets HF_HUB_OFFLINE=1 so a missing file fails fast instead of hanging.

This file must stay standalone: stdlib, numpy and Pillow at import time, lavis/torch only inside
`load_lavis_captioner`. The main environment imports it only for the protocol helpers.

Protocol: one JSON object per line, UTF-8.
  worker -> parent, once:  {"ready": true, "info": {...}}  or  {"ready": false, "error": "..."}
  parent -> worker:        {"id": 7, "images": ["<base64 PNG>", ...]}     ({"op": "shutdown"} ends)
  worker -> parent:        {"id": 7, "captions": ["...", ...]}  or  {"id": 7, "error": "..."}
Images are (H, W, 3) uint8 RGB arrays sent as lossless PNG. Library output printed to stdout is
redirected to stderr so that stdout carries protocol lines only.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import traceback
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

PROTOCOL_VERSION = 1


# --------------------------------------------------------------------------------------------
# protocol (pure functions, shared with the parent process)


def encode_image(img: np.ndarray) -> str:
    """(H, W, 3) uint8 RGB -> base64 PNG text."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: str) -> np.ndarray:
    """base64 PNG text -> (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        return np.asarray(im.convert("RGB"))


def _line(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def encode_request(req_id: int, images: Sequence[np.ndarray]) -> str:
    return _line({"id": int(req_id), "images": [encode_image(im) for im in images]})


def decode_request(line: str) -> tuple[Optional[int], list[np.ndarray]]:
    """Request line -> (id, images); id None means shutdown."""
    msg = json.loads(line)
    if msg.get("op") == "shutdown":
        return None, []
    return int(msg["id"]), [decode_image(s) for s in msg["images"]]


def encode_shutdown() -> str:
    return _line({"op": "shutdown"})


def encode_response(req_id: int, captions: Optional[Sequence[str]] = None, error: Optional[str] = None) -> str:
    if error is not None:
        return _line({"id": int(req_id), "error": str(error)})
    return _line({"id": int(req_id), "captions": [str(c) for c in captions or []]})


def encode_ready(info: Optional[dict] = None, error: Optional[str] = None) -> str:
    if error is not None:
        return _line({"ready": False, "error": str(error), "protocol": PROTOCOL_VERSION})
    return _line({"ready": True, "info": info or {}, "protocol": PROTOCOL_VERSION})


def decode_message(line: str) -> dict:
    """Any worker -> parent line as a dict (raises ValueError on a non-protocol line)."""
    try:
        msg = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not a protocol line: {line[:200]!r}") from e
    if not isinstance(msg, dict):
        raise ValueError(f"not a protocol line: {line[:200]!r}")
    return msg


def serve(lines: Iterable[str], write: Callable[[str], None],
          caption_fn: Callable[[list[np.ndarray]], list[str]]) -> int:
    """Answer request lines with `caption_fn` until EOF or shutdown; returns requests served.

    A failing request gets an error response and the loop goes on.
    """
    served = 0
    for line in lines:
        if not line.strip():
            continue
        req_id = -1
        try:
            req_id_opt, images = decode_request(line)
            if req_id_opt is None:
                break
            req_id = req_id_opt
            caps = caption_fn(images)
            if len(caps) != len(images):
                raise RuntimeError(f"{len(caps)} captions for {len(images)} images")
            write(encode_response(req_id, caps))
        except Exception as e:  # keep serving; the parent decides what a failure means
            write(encode_response(req_id, error=f"{type(e).__name__}: {e}"))
        served += 1
    return served


# --------------------------------------------------------------------------------------------
# LAVIS side (only ever runs inside the separate environment)


def load_lavis_captioner(name: str, model_type: str, checkpoint: Optional[str], device: str,
                         prompt: Optional[str], max_new_tokens: int, num_beams: int
                         ) -> tuple[Callable[[list[np.ndarray]], list[str]], dict[str, Any]]:
    """Load a LAVIS BLIP-2 model; returns (caption_fn, info). Imports lavis and torch here."""
    import torch  # noqa: PLC0415
    import lavis  # noqa: PLC0415
    from lavis.models import load_model_and_preprocess, load_preprocess  # noqa: PLC0415
    from lavis.common.registry import registry  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if checkpoint:
        # Build the architecture without fetching the fine-tuned weights, then load the local file.
        model_cls = registry.get_model_class(name)
        cfg = OmegaConf.load(model_cls.default_config_path(model_type))
        cfg.model.load_finetuned = False
        cfg.model.load_pretrained = False
        model = model_cls.from_config(cfg.model)
        model.load_checkpoint(checkpoint)
        vis_processors, _ = load_preprocess(cfg.preprocess)
        model.eval()
        if device == "cpu":
            model = model.float()
        model = model.to(device)
    else:
        model, vis_processors, _ = load_model_and_preprocess(
            name=name, model_type=model_type, is_eval=True, device=device)
    vis = vis_processors["eval"]

    @torch.no_grad()
    def caption_fn(images: list[np.ndarray]) -> list[str]:
        if not images:
            return []
        batch = torch.stack([vis(Image.fromarray(im)) for im in images]).to(device)
        samples: dict[str, Any] = {"image": batch}
        if prompt:
            samples["prompt"] = prompt
        return [c.strip() for c in model.generate(samples, num_beams=num_beams, max_length=max_new_tokens)]

    info = {"lavis_version": getattr(lavis, "__version__", "unknown"), "torch": torch.__version__,
            "device": device, "name": name, "model_type": model_type, "checkpoint": checkpoint or ""}
    return caption_fn, info


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="blip2_opt")
    ap.add_argument("--model-type", default="caption_coco_opt2.7b")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--num-beams", type=int, default=3)
    args = ap.parse_args(argv)

    # Keep the real stdout for protocol lines only; everything else printing to stdout (Python or C
    # level) goes to stderr instead.
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def write(s: str) -> None:
        out.write(s)
        out.flush()

    try:
        caption_fn, info = load_lavis_captioner(args.name, args.model_type, args.checkpoint, args.device,
                                                args.prompt, args.max_new_tokens, args.num_beams)
    except ImportError as e:
        write(encode_ready(error=f"lavis is not importable in {sys.executable} ({e}). Install "
                                 "salesforce-lavis in that separate environment."))
        return 2
    except Exception as e:
        traceback.print_exc()
        write(encode_ready(error=f"loading LAVIS {args.name}/{args.model_type} failed: {type(e).__name__}: {e}"))
        return 3
    info["python"] = sys.executable
    write(encode_ready(info))
    serve(sys.stdin, write, caption_fn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
