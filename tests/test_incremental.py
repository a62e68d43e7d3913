"""Correct incremental rebuilds: every input that shapes an output is in its cache key, failures of the
run heal, and the README's "What recomputes" table holds row by row.

The small project: three photos in a folder source (`people/<identity>/`), one in a manifest source,
each with exactly one `ok` face, built once; every test starts from a copy of that build at the same
absolute path (so its caches stay valid).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline import plugins
from pipeline.config import load_params
from pipeline.stage import Context
from tests.conftest import PERSONA, REPO

COLUMNS = ("ingest", "align", "masks", "caption", "wplus", "identity", "shards")
PHOTOS = {
    "people/obama/obama.jpg": "sample/obama/obama.jpg",
    "people/obama/obama2.jpg": "sample/obama/obama2.jpg",
    "people/biden/biden.jpg": "sample/biden/biden.jpg",
    "listed/obama3.jpg": "sample/obama/obama3.jpg",
}
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}


def readme_rows() -> dict[str, dict[str, str]]:
    """{row id: {stage: cell}} of the README's "What recomputes" table."""
    text = (REPO / "README.md").read_text()
    section = text.split("### What recomputes", 1)[1].split("\n## ", 1)[0]
    header, rows = None, {}
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        rows[re.match(r"`([a-z-]+)`", cells[0]).group(1)] = dict(zip(header[1:], cells[1:]))
    assert header is not None and tuple(header[1:]) == COLUMNS
    return rows


def layout(proj: Path, sample_raw: Path) -> Path:
    """The small project's photos, manifest and params.yaml under `proj`."""
    for rel, src in PHOTOS.items():
        (proj / "raw" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sample_raw / src, proj / "raw" / rel)
    (proj / "raw/listed/list.csv").write_text("path,identity\nobama3.jpg,barack\n")
    params = {
        "data_root": str(proj / "data"),
        "runtime": {"executor": "local", "progress": False, "part_size": 2, "max_attempts": 2},
        "ingest": {"sources": [{"name": "people", "path": str(proj / "raw/people")},
                               {"name": "listed", "path": str(proj / "raw/listed/list.csv")}]},
        "wplus": {"input_size": 64},
        "shards": {"samples_per_shard": 100, "grid_size": 4, "grid_tile": 32},
    }
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    return proj


def context(proj: Path) -> Context:
    return Context.make(load_params(proj / "params.yaml"), proj / "data", proj / "metrics")


def build(ctx: Context) -> dict[str, dict]:
    return {s.name: s.run(ctx) for s in plugins.data_stages()}


def set_params(proj: Path, **sections) -> None:
    p = yaml.safe_load((proj / "params.yaml").read_text())
    for k, v in sections.items():
        p.setdefault(k, {}).update(v)
    (proj / "params.yaml").write_text(yaml.safe_dump(p))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, sample_raw):
    base = tmp_path_factory.mktemp("incremental")
    proj = layout(base / "proj", sample_raw)
    stats = build(context(proj))
    assert all(stats[s]["counts"].get("ok") == 4 for s in ("ingest", "masks", "caption", "wplus", "identity")), stats
    shutil.copytree(proj, base / "pristine")
    return proj


@pytest.fixture
def project(pristine) -> Path:
    """The built small project, reset to its first build (same path, mtimes kept)."""
    shutil.rmtree(pristine)
    shutil.copytree(pristine.parent / "pristine", pristine)
    return pristine


def check_row(row_id: str, stats: dict[str, dict], n: int = 0) -> None:
    """`stats` (per stage, of one run) agree with the README row: `item`/`source` = n items computed."""
    for stage, cell in readme_rows()[row_id].items():
        st = stats[stage]
        if stage == "shards":
            assert st["rewritten"] == (cell == "rewritten"), (row_id, stage, st)
        elif cell == "-":
            assert st["computed"] == 0, (row_id, stage, st)
        elif cell == "all":
            assert st["computed"] == st["inputs"] > 0, (row_id, stage, st)
        else:
            assert cell in ("item", "source") and st["computed"] == n > 0, (row_id, stage, st)


def _remove_blob(proj: Path, column: str = "wild_blob") -> tuple[Path, Path]:
    t = pd.read_parquet(proj / "data/align/table.parquet")
    rel = t[t["status"] == "ok"].sort_values("key")[column].iloc[0]
    blob = proj / "data/align" / rel
    aside = blob.with_name(blob.name + ".aside")
    blob.rename(aside)
    return blob, aside


# ------------------------------------------------------------------------- the README table, in-process


def _tiny_arcface(path: Path) -> Path:
    import torch

    from pipeline.models.identity import IResNet

    torch.manual_seed(0)
    torch.save(IResNet((1, 1, 1, 1), num_features=512).eval().state_dict(), path)
    return path


def _reencode(p: Path, quality: int = 90) -> None:
    buf = io.BytesIO()
    Image.open(p).convert("RGB").save(buf, "JPEG", quality=quality)
    p.write_bytes(buf.getvalue())


def _photo_added(proj: Path, raw: Path) -> int:
    (proj / "raw/people/grace").mkdir()
    shutil.copy2(raw / "sample/grace_hopper/grace_hopper.jpg", proj / "raw/people/grace/grace.jpg")
    return 1


def _photo_moved(proj: Path, raw: Path) -> int:
    shutil.move(proj / "raw/people/obama/obama2.jpg", proj / "raw/people/biden/obama2.jpg")
    return 1


def _manifest_label(proj: Path, raw: Path) -> int:
    (proj / "raw/listed/list.csv").write_text("path,identity\nobama3.jpg,Barack Obama\n")
    return 1


SCENARIOS = {  # row id -> change the project; return the number of photos it touches (for `item`/`source`)
    "photo-added": _photo_added,
    "photo-edited": lambda proj, raw: _reencode(proj / "raw/people/obama/obama2.jpg") or 1,
    "photo-touched": lambda proj, raw: os.utime(proj / "raw/people/obama/obama.jpg", ns=(10**18, 10**18)) or 1,
    "photo-moved": _photo_moved,
    "manifest-label": _manifest_label,
    "source-config": lambda proj, raw: _flip_labeled(proj) or 3,
    "stage-params": lambda proj, raw: set_params(proj, masks={"erode_at_1024": 30}) or 0,
    "model-weights": lambda proj, raw: set_params(
        proj, identity={"model_path": str(_tiny_arcface(proj / "arcface.pth"))}) or 0,
    "run-settings": lambda proj, raw: set_params(
        proj, runtime={"part_size": 1, "workers": 3}, masks={"batch_size": 1}, identity={"batch_size": 3},
        wplus={"num_gpus": 0.5}) or 0,
}


def _flip_labeled(proj: Path) -> None:
    p = yaml.safe_load((proj / "params.yaml").read_text())
    p["ingest"]["sources"][0]["labeled"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(p))


def _transient(proj: Path, raw: Path) -> int:
    """A failure of the run on one face in masks (its input blob is gone while masks recomputes);
    then the blob is back. The row is about the run after that."""
    set_params(proj, masks={"erode_at_1024": 30})
    blob, aside = _remove_blob(proj)
    stats = build(context(proj))
    assert stats["masks"]["retrying"] == 1 and stats["masks"]["counts"]["error"] == 1
    aside.rename(blob)
    return 1


SCENARIOS["transient"] = _transient
CODE_ROWS = ("code-model", "code-stage", "code-framework", "code-comments")


def test_every_readme_row_has_a_check():
    assert set(readme_rows()) == set(SCENARIOS) | set(CODE_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("row_id", sorted(SCENARIOS))
def test_what_recomputes(project, sample_raw, row_id):
    n = SCENARIOS[row_id](project, sample_raw)
    check_row(row_id, build(context(project)), n)
    again = build(context(project))  # and then nothing
    assert all(again[s]["computed"] == 0 for s in COLUMNS if s != "shards") and not again["shards"]["rewritten"]


# --------------------------------------------------------------------------------------- relabelling


def _shard_identities(proj: Path) -> dict[str, str]:
    """face key -> identity in the shard samples' json."""
    out = {}
    for tar in sorted((proj / "data/shards").rglob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    out[meta["key"]] = (meta["identity"], meta["identity_label"])
    return out


def test_relabelling_reaches_every_table_and_the_shards(project, sample_raw):
    ctx = context(project)
    old, new = project / "raw/people/obama/obama2.jpg", project / "raw/people/biden/obama2.jpg"
    _photo_moved(project, sample_raw)
    _manifest_label(project, sample_raw)
    stats = build(ctx)
    assert stats["align"]["computed"] == 2 and stats["identity"]["computed"] == 2

    tables = {s: pd.read_parquet(project / "data" / s / "table.parquet") for s in ("ingest", "dedup", "align")}
    for stage, t in tables.items():
        assert not t["path"].eq(str(old)).any(), f"{stage} keeps a stale row for the moved photo"
        assert set(t.loc[t["path"] == str(new), "identity"]) == {"biden"}, stage
        listed = t[t["source"] == "listed"]
        slug = listed["identity"].iloc[0]
        assert re.fullmatch(r"Barack_Obama-[0-9a-f]{8}", slug) and set(listed["identity_label"]) == {"Barack Obama"}, stage
    align = tables["align"]
    moved_faces = set(align.loc[(align["path"] == str(new)) & (align["status"] == "ok"), "key"])
    listed_faces = set(align.loc[(align["source"] == "listed") & (align["status"] == "ok"), "key"])
    assert len(moved_faces) == len(listed_faces) == 1
    for stage in ("masks", "caption", "wplus", "identity"):  # recomputed under the new labels, no stale rows
        t = pd.read_parquet(project / "data" / stage / "table.parquet")
        assert set(t["key"]) == set(align.loc[align["status"] == "ok", "key"]), stage
    shards = _shard_identities(project)
    assert [shards[k] for k in moved_faces] == [("biden", "biden")]
    assert [shards[k] for k in listed_faces] == [(slug, "Barack Obama")]
    tsv = pd.read_csv(project / "data/shards/samples.tsv", sep="\t")
    assert set(tsv.loc[tsv["key"].isin(moved_faces), "identity"]) == {"biden"}
    index = json.loads((project / "data/shards/index.json").read_text())
    assert index["identities"]["biden"]["faces"] == 2 and index["identities"]["obama"]["faces"] == 1


# ------------------------------------------------------------------------------ failures of the run


def test_transient_failure_heals_to_the_clean_bytes_or_ends_final_after_max_attempts(project):
    set_params(project, masks={"erode_at_1024": 30})
    from stages import masks

    masks.run(context(project))
    clean = (project / "data/masks/table.parquet").read_bytes()

    # heal: a failure of the run, then the next run retries it and the table is the clean one
    for trial in ("heal", "final"):
        shutil.rmtree(project)
        shutil.copytree(project.parent / "pristine", project)
        set_params(project, masks={"erode_at_1024": 30})
        blob, aside = _remove_blob(project)
        first = masks.run(context(project))
        t = pd.read_parquet(project / "data/masks/table.parquet")
        err = t[t["status"] == "error"]
        assert first["retrying"] == 1 and len(err) == 1 and "attempt 1 of 2: retried" in err["error"].iloc[0]
        assert json.loads((project / "data/runs/masks.json").read_text())["retrying"] == 1
        if trial == "heal":
            aside.rename(blob)
            second = masks.run(context(project))
            assert second["computed"] == 1 and second["retrying"] == 0
            assert (project / "data/masks/table.parquet").read_bytes() == clean
        else:  # still failing: the second attempt is the last, then it is final and cached
            second = masks.run(context(project))
            assert second["computed"] == 1 and second["retrying"] == 0 and second["failed"] == 1
            t = pd.read_parquet(project / "data/masks/table.parquet")
            assert "attempt 2 of 2: final" in t.loc[t["status"] == "error", "error"].iloc[0]
            assert masks.run(context(project))["computed"] == 0


def test_persona_stage_exits_75_while_failures_of_the_run_wait_for_a_retry(project):
    set_params(project, masks={"erode_at_1024": 30})
    blob, aside = _remove_blob(project)
    cmd = PERSONA + ["stage", "masks", "--params", str(project / "params.yaml"), "--metrics-dir", str(project / "metrics")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 75 and "retrying=1" in r.stdout and "run again to retry" in r.stderr, r.stdout + r.stderr
    aside.rename(blob)
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0 and "computed=1" in r.stdout, r.stdout + r.stderr


def test_permanent_verdicts_stay_cached(project):
    align = pd.read_parquet(project / "data/align/table.parquet")
    assert {"no_landmarks", "too_small"} & set(align["status"])  # biden.jpg has rejected detections
    from stages import align as align_stage

    assert align_stage.run(context(project))["computed"] == 0


# ------------------------------------------------------------------------------------ run reports


def test_run_reports_are_outside_the_stage_folders(project):
    for s in COLUMNS:
        assert not list((project / "data" / s).glob("last_run.json")), s
        assert json.loads((project / "data/runs" / f"{s}.json").read_text())["stage"] == s
    before = {p: p.read_bytes() for s in COLUMNS for p in sorted((project / "data" / s).rglob("*")) if p.is_file()}
    build(context(project))
    after = {p: p.read_bytes() for s in COLUMNS for p in sorted((project / "data" / s).rglob("*")) if p.is_file()}
    assert before == after, "a rerun that computes nothing changed a stage folder (a DVC output)"


def test_temp_files_of_a_killed_run_are_removed_by_the_next(project):
    d = project / "data/masks"
    orphans = [d / "parts/.part-000099.parquet.k2j3.tmp", d / ".tmp/.x.mask.png.a1b2.tmp",
               d / ".table.parquet.zz9.tmp", project / "data/runs/.masks.json.q1.tmp",
               project / "metrics/.masks.json.w2.tmp", project / "metrics/reports/.masks.json.r3.tmp"]
    for o in orphans:
        o.parent.mkdir(parents=True, exist_ok=True)
        o.write_bytes(b"half a file")
    from stages import masks

    assert masks.run(context(project))["computed"] == 0
    assert not [o for o in orphans if o.exists()] and not (d / ".tmp").exists()
    assert not list(project.rglob("*.tmp"))


# ----------------------------------------------------------------------------------- code changes


def test_dvc_deps_cover_each_data_stage_import_closure():
    from pipeline.codefp import import_closure

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for st in plugins.data_stages():
        entry = stages[st.name]
        assert entry["cmd"] == f"${{persona}} stage {st.name}"  # the project's interpreter (vars.persona)
        deps = [d for d in entry["deps"] if not d.startswith("${")]
        for f in import_closure(st.run.__module__):
            rel = f.relative_to(REPO).as_posix()
            assert any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps), \
                f"dvc.yaml stage '{st.name}' does not list {rel}, which its code imports"
        assert st.section is None or st.section in entry.get("params", []), st.name


def test_code_fingerprint_ignores_comments_and_docstrings_not_code(tmp_path, monkeypatch):
    from pipeline import codefp

    pkg = tmp_path / "fpdemo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text('"""Doc."""\nX = 1\n')
    (pkg / "main.py").write_text("def f():\n    from fpdemo import helper\n    return helper.X\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {p.name for p in codefp.import_closure("fpdemo.main")} == {"__init__.py", "helper.py", "main.py"}
    fp = codefp.code_fingerprint("fpdemo.main")
    (pkg / "helper.py").write_text('"""Another doc."""\n# a comment\nX = (\n    1\n)\n')
    assert codefp.code_fingerprint("fpdemo.main") == fp
    (pkg / "helper.py").write_text('"""Doc."""\nX = 2\n')
    assert codefp.code_fingerprint("fpdemo.main") != fp


def _edit(path: Path, how: str) -> None:
    src = path.read_text()
    if how == "comments":  # comments, a docstring and formatting only
        src = "# reviewed\n" + src.replace("\n\n\n", "\n\n\n# (spacing)\n\n", 1).rstrip() + "\n\n\n"
        src = src.replace('"""', '"""Note: ', 1)
    else:
        src += "\n_TEST_CODE_CHANGE = 1\n"
    path.write_text(src)


@pytest.mark.slow
def test_code_changes_recompute_the_stages_that_import_them(tmp_path, sample_raw):
    code = tmp_path / "code"
    for d in ("pipeline", "stages", "training"):
        shutil.copytree(REPO / d, code / d, ignore=shutil.ignore_patterns("__pycache__"))
    proj = layout(tmp_path / "proj", sample_raw)
    env = {**ENV, "PYTHONPATH": str(code)}

    def run_build() -> dict[str, dict]:
        r = subprocess.run(PERSONA + ["build", "--params", str(proj / "params.yaml")], cwd=code, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return {s: json.loads((proj / "data/runs" / f"{s}.json").read_text()) for s in COLUMNS}

    run_build()
    for row_id, files in (
        ("code-comments", ("pipeline/models/identity.py", "stages/masks.py", "pipeline/store.py")),
        ("code-model", ("pipeline/models/identity.py",)),
        ("code-stage", ("stages/masks.py",)),
        ("code-framework", ("pipeline/store.py",)),
    ):
        for f in files:
            _edit(code / f, "comments" if row_id == "code-comments" else "code")
        stats = run_build()
        check_row(row_id, stats)
