"""BLIP-2 captioner: transformers backend on a tiny random HF folder, none backend, LAVIS worker
refusal and its wire protocol. No network: every file is written here."""
from __future__ import annotations

import io
import logging
import sys

import numpy as np
import pytest
import torch

from pipeline.config import CaptionConfig
from pipeline.models import caption
from pipeline.models import lavis_worker as proto

WORDS = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "man", "woman", "smiling", "the", "with", "hat",
         "person", "face", "in", "red", "glasses", "beard", "young", "old"]
PROMPT = "a photo of"


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48 + 8 * i, 40, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory):
    """A real (tiny, randomly initialised) BLIP-2 OPT folder, as `save_pretrained` writes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig, PreTrainedTokenizerFast)

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    # the processor adds the "<image>" placeholder token; the LM vocabulary must include it
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                          num_query_tokens=4)
    vocab = len(tok)
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, cross_attention_frequency=1,
                                          vocab_size=vocab).to_dict(),
        text_config=OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                              pad_token_id=0, bos_token_id=1, eos_token_id=1).to_dict(),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(cfg).eval()
    # random weights would often stop at once; the folder's generation config (honoured by the
    # captioner) asks for >= 2 tokens and bans the special tokens, so captions are non-empty words
    model.generation_config.min_new_tokens = 2
    model.generation_config.suppress_tokens = [0, 2, cfg.image_token_index]
    path = tmp_path_factory.mktemp("blip2-tiny")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def test_transformers_backend_captions(blip2_folder):
    cfg = CaptionConfig(model_path=str(blip2_folder), max_new_tokens=5, num_beams=2, batch_size=2)
    assert caption.resolve_backend(cfg) == "transformers"  # auto + model_path
    cap = caption.load(cfg, device="cpu")
    assert cap.backend == "transformers"
    # the loader cannot tell trained from random weights: loaded from a checkpoint -> weights_real
    assert cap.info.weights_real is True and cap.info.name == f"blip2-transformers:{blip2_folder.name}"
    assert cap.info.fingerprint == caption.folder_fingerprint(blip2_folder)
    imgs = _images(3)
    out = cap.caption(imgs)  # 3 images, batches of 2
    assert isinstance(out, list) and len(out) == 3 and all(isinstance(c, str) for c in out)
    assert out == cap.caption(imgs)  # deterministic (no sampling)
    assert out[:2] == cap.caption(imgs[:2])  # batching does not change results
    for c in out:
        words = c.split()
        assert 2 <= len(words) <= 5 and set(words) <= set(WORDS[3:]), c  # no placeholders, <= max_new_tokens
    assert cap.caption([]) == []
    with pytest.raises(caption.CaptionError, match="uint8 RGB"):
        cap.caption([np.zeros((8, 8), np.uint8)])


def test_transformers_prompt_is_stripped(blip2_folder):
    cfg = CaptionConfig(backend="transformers", model_path=str(blip2_folder), prompt=PROMPT, max_new_tokens=4,
                        num_beams=1)
    cap = caption.load(cfg, device="cpu")
    imgs = _images(2, seed=3)
    out = cap.caption(imgs)
    inputs = cap._inputs(imgs)
    with torch.inference_mode():
        full = cap.model.generate(**inputs, generation_config=cap.model.generation_config, max_new_tokens=4,
                                  num_beams=1, do_sample=False)
    decoded = cap.processor.batch_decode(full, skip_special_tokens=True)
    for c, d in zip(out, decoded):
        assert d.startswith(PROMPT)  # the LM returns the prompt too ...
        assert c == d[len(PROMPT):].strip()  # ... and the captioner keeps only the continuation
        assert 2 <= len(c.split()) <= 4


def test_transformers_missing_folder_is_clear(tmp_path):
    with pytest.raises(caption.CaptionError, match="is not a folder"):
        caption.load(CaptionConfig(backend="transformers", model_path=str(tmp_path / "nope")))
    with pytest.raises(caption.CaptionError, match="no config.json"):
        caption.load(CaptionConfig(backend="transformers", model_path=str(tmp_path)))
    with pytest.raises(caption.CaptionError, match="needs caption.model_path"):
        caption.load(CaptionConfig(backend="transformers"))


def test_none_backend(caplog):
    with caplog.at_level(logging.WARNING, logger="persona.models"):
        cap = caption.load(CaptionConfig())  # auto without model_path -> none
    assert cap.backend == "none" and cap.info.name == "none" and cap.info.weights_real is False
    assert cap.caption(_images(2)) == ["", ""]
    assert any("NO captions" in r.getMessage() for r in caplog.records)


def test_lavis_needs_a_separate_python(tmp_path):
    with pytest.raises(caption.CaptionError, match="needs caption.lavis_python"):
        caption.load(CaptionConfig(backend="lavis"))
    with pytest.raises(caption.CaptionError, match="not an executable python"):
        caption.load(CaptionConfig(backend="lavis", lavis_python=str(tmp_path / "bin" / "python")))
    with pytest.raises(caption.CaptionError, match="LAVIS checkpoint file not found"):
        caption.load(CaptionConfig(backend="lavis", lavis_python=sys.executable,
                                   model_path=str(tmp_path / "blip2.pth")))


def test_lavis_worker_refuses_in_env_without_lavis():
    """The real worker, started with the main env's python (which has no lavis), reports that."""
    with pytest.raises(caption.CaptionError, match=r"did not start: lavis is not importable in .*Install"):
        caption.load(CaptionConfig(backend="lavis", lavis_python=sys.executable, lavis_timeout_s=120))


def test_protocol_roundtrip():
    imgs = _images(2, seed=7)
    for im in imgs:
        assert np.array_equal(proto.decode_image(proto.encode_image(im)), im)  # lossless
    line = proto.encode_request(5, imgs)
    assert line.endswith("\n") and line.count("\n") == 1
    rid, got = proto.decode_request(line)
    assert rid == 5 and all(np.array_equal(a, b) for a, b in zip(got, imgs))
    assert proto.decode_request(proto.encode_shutdown()) == (None, [])
    assert proto.decode_message(proto.encode_response(5, ["a man", "a woman"])) == {"id": 5, "captions": ["a man", "a woman"]}
    assert proto.decode_message(proto.encode_response(6, error="boom")) == {"id": 6, "error": "boom"}
    assert proto.decode_message(proto.encode_ready({"device": "cpu"}))["ready"] is True
    assert proto.decode_message(proto.encode_ready(error="no lavis"))["ready"] is False
    with pytest.raises(ValueError, match="not a protocol line"):
        proto.decode_message("Loading checkpoint shards...\n")
    with pytest.raises(ValueError):
        proto.encode_image(np.zeros((4, 4), np.uint8))


def test_serve_loop_answers_in_order_and_survives_errors():
    """The worker's request loop, driven with a plain function in place of the LAVIS model."""
    def describe(images):
        if any(im.shape[0] > 100 for im in images):
            raise RuntimeError("too big")
        return [f"{im.shape[0]}x{im.shape[1]}" for im in images]

    reqs = [proto.encode_request(1, _images(2)), "\n", proto.encode_request(2, [np.zeros((200, 8, 3), np.uint8)]),
            proto.encode_request(3, _images(1)), proto.encode_shutdown(), proto.encode_request(4, _images(1))]
    buf = io.StringIO()
    served = proto.serve(iter(reqs), buf.write, describe)
    answers = [proto.decode_message(s) for s in buf.getvalue().splitlines()]
    assert served == 3
    assert answers[0] == {"id": 1, "captions": ["48x40", "56x40"]}
    assert answers[1]["id"] == 2 and "too big" in answers[1]["error"]
    assert answers[2] == {"id": 3, "captions": ["48x40"]}
    assert len(answers) == 3  # nothing after shutdown
