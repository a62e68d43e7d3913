"""Plugins: the framework names no stage, command or section; a new stage is a module + entry points."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import tarfile

import pytest
import yaml

from pipeline import plugins
from pipeline.plugins import ALL, PluginError, Stage, order
from tests.conftest import PERSONA, REPO


# Functions allowed to name stages: the reader's in-memory samples (they move out of pipeline/shards.py
# with the reader, issue 12).
ALLOWED = {"synthetic_samples"}


def _literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings (nor inside an ALLOWED function)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        if isinstance(node, ast.FunctionDef) and node.name in ALLOWED:
            skip |= {id(n) for n in ast.walk(node)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_pipeline_imports_and_names_no_consumer():
    consumers = {"stages", "training", "benchmarks", "tests"}
    # `identity` is also the person label every row carries (the framework's identity split) and
    # `shards` the shard format pipeline/shards.py defines: words of the framework, not the stages
    names = set(plugins.stage_names()) - {"identity", "shards"}
    found = []
    for f in sorted((REPO / "pipeline").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""]
            found += [f"{f.relative_to(REPO)}:{node.lineno} imports {m}" for m in mods if m.split(".")[0] in consumers]
        for line, s in _literals(tree):
            if s in names or any(s.startswith(f"{c}.") for c in consumers):
                found.append(f"{f.relative_to(REPO)}:{line} names {s!r}")
    assert not found, "pipeline/ names its consumers:\n" + "\n".join(found)


def _st(name, *after):
    return Stage(name=name, run=lambda ctx: {}, after=tuple(after))


def test_order_is_topological_with_ties_by_name_and_sinks_last():
    st = {s.name: s for s in (_st("z"), _st("b", "z"), _st("a", "z"), _st("sink", ALL), _st("c", "a", "b"))}
    assert [s.name for s in order(st)] == ["z", "a", "b", "c", "sink"]
    with pytest.raises(PluginError, match="unknown stage"):
        order({"a": _st("a", "nope")})
    with pytest.raises(PluginError, match="cycle"):
        order({"a": _st("a", "b"), "b": _st("b", "a")})


def test_registered_stages_in_pipeline_order():
    names = [s.name for s in plugins.data_stages()]
    assert names[:3] == ["ingest", "dedup", "align"] and names[-1] == "shards"
    assert names.index("masks") < names.index("wplus")
    assert sorted(names) == plugins.stage_names()


TOY_STAGE = '''"""toy: the mean colour of each aligned face (a stage that lives outside the project)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from pipeline.codefp import code_fingerprint
from pipeline.config import section_hash
from pipeline.images import decode_image
from pipeline.models.base import ModelInfo
from pipeline.plugins import Member, Stage
from pipeline.stage import (StageSpec, array_columns, array_rows, face_metrics, join_inputs, prepare,
                            run_item_stage, write_metrics)
from pipeline.store import BlobStore, ItemStore


@dataclass
class ToyConfig:
    scale: float = 1.0
    batch_size: int = 4


INFO = ModelInfo("toy-mean", "toyfp", False, "none")


class _Worker:
    def __init__(self, cfg, root, stage_dir):
        self.cfg, self.align, self.blobs = cfg, ItemStore(root, "align").blobs, BlobStore(stage_dir)

    def __call__(self, batch):
        means = [decode_image(self.align.get(it["face_blob"])).reshape(-1, 3).mean(0) / 255 * self.cfg.scale
                 for it in batch]
        return array_rows(batch, means, self.blobs, "toy", INFO)


def run(ctx):
    cfg = ctx.params.toy
    store = prepare(ctx, "toy")
    inputs = join_inputs(ctx, "align", columns=("face_blob",))
    spec = StageSpec("toy", code_fingerprint(__name__), section_hash(cfg), array_columns("toy"), INFO.fingerprint,
                     cfg.batch_size)
    factory = functools.partial(_Worker, cfg, str(ctx.root), str(store.dir))
    table, stats = run_item_stage(spec, store, inputs, factory, ctx.params.runtime)
    write_metrics(ctx.metrics_path("toy"), face_metrics("toy", inputs, table, INFO))
    return stats.as_dict()


STAGE = Stage(name="toy", run=run, after=("align",), section="toy", shard="optional", model="toy",
              members=(Member("toy.npy", "toy_blob", kind="npy", shape=(3,), dtype="float32"),))
'''


@pytest.mark.slow
def test_a_new_stage_is_one_module_and_its_entry_points(tmp_path, sample_raw):
    """A stage, its params section and its shard member, registered from outside the project:
    listed, run in order, validated, and its member lands in every shard sample."""
    plug = tmp_path / "plugin"
    (plug / "persona_toy-0.1.dist-info").mkdir(parents=True)
    (plug / "persona_toy.py").write_text(TOY_STAGE)
    (plug / "persona_toy-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: persona-toy\nVersion: 0.1\n")
    (plug / "persona_toy-0.1.dist-info" / "entry_points.txt").write_text(
        "[persona.stages]\ntoy = persona_toy:STAGE\n\n[persona.sections]\ntoy = persona_toy:ToyConfig\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(plug)])}

    out = subprocess.run(PERSONA + ["stages"], capture_output=True, text=True, env=env, check=True).stdout
    names = [ln.split()[0] for ln in out.splitlines()]
    assert names.index("align") < names.index("toy") < names.index("shards") and "mean colour" in out

    photos = tmp_path / "photos"
    for who, f in (("obama", "obama.jpg"), ("biden", "biden.jpg")):
        (photos / who).mkdir(parents=True)
        shutil.copy(sample_raw / "sample" / who / f, photos / who / f)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"runtime": {"executor": "local", "progress": False},
                                      "wplus": {"input_size": 64}, "toy": {"scale": 2.0}}))
    r = subprocess.run(PERSONA + ["build", "--source", str(photos), "--out", str(tmp_path / "out"), "--params", str(params)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.index("[align]") < r.stdout.index("[toy]") < r.stdout.index("[shards]")
    index = json.loads((tmp_path / "out/shards/index.json").read_text())
    assert "toy" in index["stages"] and "toy.npy" in index["sample_keys"]
    n = 0
    for sh in index["shards"]:
        with tarfile.open(tmp_path / "out/shards" / sh["file"]) as tf:
            names = tf.getnames()
            for m in names:
                if m.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    assert meta["models"]["toy"]["name"] == "toy-mean"
                    assert f"{meta['key']}.toy.npy" in names
                    n += 1
    assert n == index["splits"]["train"]["samples"] + index["splits"]["val"]["samples"] == 2

    params.write_text(yaml.safe_dump({"toy": {"scael": 2.0}}))  # the section is validated like any other
    r = subprocess.run(PERSONA + ["stage", "toy", "--params", str(params), "--root", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "unknown key 'toy.scael'" in r.stderr


def test_a_checkout_registers_from_its_own_pyproject(tmp_path):
    """Code run from a checkout (PYTHONPATH, a Ray Job's working dir) uses that checkout's entry points,
    not the installed metadata: a stage added there is seen without reinstalling."""
    for d in ("pipeline", "stages"):
        shutil.copytree(REPO / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "stages" / "toy.py").write_text(TOY_STAGE)
    pp = (REPO / "pyproject.toml").read_text().replace(
        '[project.entry-points."persona.stages"]\n', '[project.entry-points."persona.stages"]\ntoy = "stages.toy:STAGE"\n')
    (tmp_path / "pyproject.toml").write_text(pp.replace(
        '[project.entry-points."persona.sections"]\n', '[project.entry-points."persona.sections"]\ntoy = "stages.toy:ToyConfig"\n'))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(PERSONA + ["stages"], capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert [ln.split()[0] for ln in out.splitlines()].count("toy") == 1
    out = subprocess.run(PERSONA + ["stages"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "toy" not in out.split()  # the repository's own checkout does not have it
