import subprocess

import pandas as pd
import pytest
import yaml

from tests.conftest import PERSONA


def test_help_lists_commands():
    out = subprocess.run(PERSONA + ["--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("sample", "stage", "build", "stages"):
        assert cmd in out
    out = subprocess.run(PERSONA + ["build", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--source" in out and "--until" in out


def test_unknown_stage_is_clear_error(tmp_path):
    r = subprocess.run(PERSONA + ["stage", "nope", "--params", str(tmp_path / "none.yaml")], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown stage 'nope'" in r.stderr


def test_build_on_any_folder(tmp_path, sample_raw):
    out = tmp_path / "out"
    r = subprocess.run(
        PERSONA + ["build", "--source", str(sample_raw / "sample"), "--out", str(out), "--until", "dedup",
                   "--params", str(tmp_path / "defaults.yaml")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    t = pd.read_parquet(out / "dedup" / "table.parquet")
    assert len(t) == 7 and set(t["identity"]) == {"obama", "biden", "yao_ming", "grace_hopper", "eileen_collins"}
    assert (out / "metrics" / "ingest.json").exists()
    assert not (out / "align").exists()  # --until stops after dedup


# ------------------------------------------------------- `persona train submit` / `persona build submit`

SUBMIT_OPTS = ["--address", "http://127.0.0.1:1", "--working-dir", "/somewhere", "--env", "A=1", "--no-wait"]


def _parse(argv):
    from pipeline.cli import build_parser

    return build_parser().parse_args(argv)


def test_help_shows_submit():
    for cmd in ("train", "build"):
        out = subprocess.run(PERSONA + [cmd, "--help"], capture_output=True, text=True, check=True).stdout
        assert "[submit]" in out and "--no-wait" in out and "--working-dir" in out, out


def test_train_submit_and_the_submit_flag_give_one_job_entrypoint():
    from pipeline.jobs import is_submit
    from training.cli import job_command

    train = ["--stage", "2", "--params", "p.yaml", "--max-steps", "3", "--set", "train.resolution=64",
             "--set", "train.seed=1", "--workers", "2", "--cpus-per-worker", "0.5", "--use-gpu", "--json"]
    spelled = _parse(["train", "submit", *train, *SUBMIT_OPTS])
    flagged = _parse(["train", *train, "--submit", *SUBMIT_OPTS])
    assert is_submit(spelled) and is_submit(flagged) and not is_submit(_parse(["train", *train]))
    entry = job_command(spelled)
    assert entry == job_command(flagged)
    assert entry[:4] == ["python", "-m", "pipeline.cli", "train"]
    assert not {"submit", "--submit", "--address", "--working-dir", "--env", "--no-wait"} & set(entry)
    # the job runs exactly the local command: the entrypoint parses back to the same options, not a submit
    back = _parse(entry[3:])
    assert not is_submit(back)
    for key in ("stage", "params", "max_steps", "set", "workers", "cpus_per_worker", "use_gpu", "json", "resume"):
        assert getattr(back, key) == getattr(spelled, key), key


def test_build_submit_job_entrypoint():
    from pipeline.cli import build_job_command
    from pipeline.jobs import is_submit

    build = ["--source", "photos", "--out", "/tmp/o", "--until", "dedup", "--name", "mine", "--unlabeled",
             "--params", "data/params.yaml"]
    args = _parse(["build", "submit", *build, *SUBMIT_OPTS])
    assert is_submit(args) and args.no_wait and args.address == "http://127.0.0.1:1" and args.env == ["A=1"]
    entry = build_job_command(args)
    assert entry[:4] == ["python", "-m", "pipeline.cli", "build"]
    back = _parse(entry[3:])
    assert not is_submit(back)
    assert {k: getattr(back, k) for k in ("source", "out", "until", "name", "unlabeled", "params")} == {
        "source": "photos", "out": "/tmp/o", "until": "dedup", "name": "mine", "unlabeled": True, "params": "data/params.yaml"}
    # params mode: nothing but the params (and --until)
    assert build_job_command(_parse(["build", "submit", "--params", "p.yaml", "--until", "ingest"])) == [
        "python", "-m", "pipeline.cli", "build", "--until", "ingest", "--params", "p.yaml"]


def test_build_argument_errors_before_any_submission(tmp_path):
    from pipeline import cli

    # (the address is a closed port: reaching it would fail with a connection error, not these)
    for argv, msg in (
        (["build", "submit", "--source", "x", "--address", "http://127.0.0.1:1"], "--source needs --out"),
        (["build", "submit", "--unlabeled", "--address", "http://127.0.0.1:1"], "apply to --source only"),
        (["build", "--params", str(tmp_path / "none.yaml")], "no such file"),
        (["build", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "does not exist"),
    ):
        with pytest.raises(SystemExit, match=msg):
            cli.main(argv)


def test_build_from_params_runs_the_configured_data_stages(tmp_path, sample_raw):
    """`persona build` without --source = `persona stage NAME` for each data stage, in order."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "data_root": str(tmp_path / "data"),
        "runtime": {"executor": "local", "progress": False},
        "ingest": {"sources": [{"name": "sample", "path": str(sample_raw / "sample")}]},
    }))
    r = subprocess.run(PERSONA + ["build", "--params", str(params), "--until", "dedup"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[ingest]" in r.stdout and "[dedup]" in r.stdout and "[align]" not in r.stdout
    t = pd.read_parquet(tmp_path / "data" / "dedup" / "table.parquet")
    assert len(t) == 7 and set(t["source"]) == {"sample"}
    assert (tmp_path / "metrics" / "dedup.json").is_file()  # metrics/ beside, as dvc.yaml has it
    assert not (tmp_path / "data" / "align").exists()
    # what `persona stage dedup` would compute next is already there: nothing to redo
    r = subprocess.run(PERSONA + ["stage", "dedup", "--params", str(params)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0 and "computed=0" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------- help, version, params errors


def _walk(parser, path=("persona",)):
    """(command path, action) for every argument of every (sub)command of `parser`."""
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        yield path, a
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sub in a.choices.items():
                yield path + (name,), argparse.Namespace(help=helps.get(name), option_strings=[], dest=name)
                yield from _walk(sub, path + (name,))


def test_every_command_and_option_has_help():
    import argparse

    from pipeline.cli import build_parser

    seen, missing = 0, []
    for path, a in _walk(build_parser()):
        seen += 1
        if not a.help or a.help == argparse.SUPPRESS or not str(a.help).strip():
            missing.append(f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}")
    assert seen > 100 and not missing, missing  # every registered command's options are walked


def test_version():
    r = subprocess.run(PERSONA + ["--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("persona 0.1.0"), r.stdout + r.stderr


def test_jobs_help_names_no_internals_and_explains_submit():
    import re

    out = subprocess.run(PERSONA + ["jobs", "--help"], capture_output=True, text=True, check=True).stdout
    assert "[submit]" in out and "persona train submit" in out and "--submit" in out
    # no Python identifiers of the implementation (function names, snake_case calls)
    assert not re.search(r"\b[a-z]+_[a-z_]+\(", out) and "submit_and_wait" not in out and "add_submit_options" not in out, out
    out = subprocess.run(PERSONA + ["train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "persona train submit ..." in " ".join(out.split())  # the optional positional says what it is


def test_float_params_written_like_1e_4_and_did_you_mean():
    from pipeline.config import ConfigError, params_from_dict
    from training.config import train_params

    raw = yaml.safe_load("train:\n  methods:\n    wplus:\n      stage1: {lr: 1e-4, weight_decay: 1E-2}\n")
    assert raw["train"]["methods"]["wplus"]["stage1"]["lr"] == "1e-4"  # PyYAML: a string
    s1 = train_params(raw).phase("wplus", "stage1")
    assert s1.lr == 1e-4 and isinstance(s1.lr, float) and s1.weight_decay == 0.01
    assert train_params({}, {"wplus.stage1.lr": yaml.safe_load("3e-5")}).phase("wplus", "stage1").lr == 3e-5
    assert params_from_dict(yaml.safe_load("align: {min_detection_confidence: 5e-1}")).align.min_detection_confidence == 0.5
    with pytest.raises(ConfigError, match="expected a number, got 'fast'"):
        train_params({}, {"wplus.stage1.lr": "fast"})
    with pytest.raises(ConfigError, match="expected an integer"):  # integers stay integers
        train_params({}, {"wplus.stage1.max_steps": "1e3"})
    with pytest.raises(ConfigError, match=r"unknown key 'train.methods.wplus.stage1.lrr' \(did you mean 'lr'\?\)"):
        train_params({"train": {"methods": {"wplus": {"stage1": {"lrr": 1}}}}})
    with pytest.raises(ConfigError, match=r"override 'wplsu.stage1.lr' \(did you mean 'wplus'\?\)"):
        train_params({}, {"wplsu.stage1.lr": 1e-4})
    with pytest.raises(ConfigError, match=r"unknown key 'allign' \(did you mean 'align'\?\)"):
        params_from_dict({"allign": {}})
    with pytest.raises(ConfigError) as e:  # nothing close: no guess
        params_from_dict({"zzzzzz": {}})
    assert "did you mean" not in str(e.value)


def test_every_dvc_stage_runs_the_projects_interpreter():
    """`.venv/bin/dvc repro` works without an activated venv: every stage command starts with
    `${persona}`, which puts the project's .venv/bin first on PATH (and falls back to PATH)."""
    from tests.conftest import REPO

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (var,) = [v for v in dvc["vars"] if isinstance(v, dict) and "persona" in v]
    assert var["persona"] == 'PATH="$(pwd)/.venv/bin:$PATH" persona'
    cmds = [(name, (st.get("do") or st)["cmd"]) for name, st in dvc["stages"].items()]
    assert cmds and all(c.startswith("${persona} ") for _, c in cmds), [n for n, c in cmds if not c.startswith("${persona} ")]
    # the metrics and plot CSVs are committed (not git-ignored), so revisions and experiments compare
    ignored = (REPO / ".gitignore").read_text().split()
    assert "/metrics/" not in ignored and "/plots/" not in ignored
