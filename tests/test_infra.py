"""infra/: the manifests parse, carry what KubeRay needs, and only run `persona` commands that exist."""
from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.plugins import stage_names

INFRA = Path(__file__).resolve().parents[1] / "infra"
K8S = INFRA / "k8s"
PYPROJECT = INFRA.parent / "pyproject.toml"
SEPARATORS = {"&&", "||", ";", "|", "&", "\n"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in _docs(p)]


def _pins() -> dict[str, str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    deps = project["dependencies"] + [d for extra in project.get("optional-dependencies", {}).values() for d in extra]
    out = {}
    for d in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([\w.+-]+)", d.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def _cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) for every RayCluster and every RayJob that brings its own cluster."""
    out = []
    for p, d in _all_docs():
        if d["kind"] == "RayCluster":
            out.append((f"{p.name}:{d['metadata']['name']}", d["spec"]))
        elif d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]:
            out.append((f"{p.name}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"]))
    return out


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _gpus(container: dict) -> int:
    res = container.get("resources", {})
    return int(res.get("limits", {}).get("nvidia.com/gpu", 0))


def _subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)


def persona_commands(cmd: str) -> list[list[str]]:
    """Every `persona ...` argv a shell command line runs (through `bash -c`, `&&`, `;`, `--`)."""
    cmd = re.sub(r"(^|[ \t])#[^\n]*", r"\1", cmd, flags=re.M)  # shell comments (keeps the newline)
    lex = shlex.shlex(cmd, posix=True, punctuation_chars="();<>|&\n")
    lex.whitespace = " \t\r"  # newlines separate commands
    lex.whitespace_split = True
    lex.commenters = ""
    tokens = list(lex)
    segments, cur = [], []
    for t in tokens:
        if t in SEPARATORS:
            segments.append(cur)
            cur = []
        else:
            cur.append(t)
    segments.append(cur)
    found = []
    for seg in segments:
        while seg and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", seg[0]):  # VAR=value prefixes
            seg = seg[1:]
        if not seg:
            continue
        if seg[0] in ("bash", "sh") and "-c" in seg:
            found += persona_commands(seg[seg.index("-c") + 1])
        elif seg[0].rsplit("/", 1)[-1] == "persona":  # persona, .venv/bin/persona
            seg = ["persona", *seg[1:]]
            found.append(seg)
            if "--" in seg:  # `persona jobs submit ... -- persona stage ...`
                found += persona_commands(shlex.join(seg[seg.index("--") + 1 :]))
    return found


def _check_command(argv: list[str], where: str) -> None:
    subs = _subcommands()
    assert len(argv) >= 2, f"{where}: bare `persona`"
    name = argv[1]
    assert name in subs, f"{where}: `persona {name}` is not a subcommand ({sorted(subs)})"
    if name == "stage":
        assert argv[2] in stage_names(), f"{where}: `persona stage {argv[2]}` is not a data stage"
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as e:  # argparse rejects it
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse ({e})")


def test_persona_commands_parser_itself():
    cmd = 'bash -c "set -e; persona stage ingest --params p.yaml && X=1 persona stage dedup; echo persona done"'
    assert persona_commands(cmd) == [["persona", "stage", "ingest", "--params", "p.yaml"], ["persona", "stage", "dedup"]]
    nested = "persona jobs submit --address http://h:8265 -- persona train --stage 2"
    assert [c[:2] for c in persona_commands(nested)] == [["persona", "jobs"], ["persona", "train"]]
    assert persona_commands("persona stages  # list\npersona sample") == [["persona", "stages"], ["persona", "sample"]]
    assert persona_commands("kubectl -n persona create secret generic x") == []


def test_every_manifest_parses_and_names_itself():
    docs = _all_docs()
    assert {p.name for p, _ in docs} >= {
        "raycluster.yaml", "rayjob-build.yaml", "rayjob-train-stage1.yaml", "rayjob-train-stage2.yaml", "mlflow.yaml", "storage.yaml",
    }
    for p, d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), f"{p.name}: {d}"
    names = [(d["kind"], d["metadata"]["name"]) for _, d in docs]
    assert len(names) == len(set(names)), "two objects share a kind and name"


def test_ray_clusters_have_the_kuberay_fields():
    ray_pin = _pins()["ray"]
    specs = _cluster_specs()
    assert len(specs) == 3  # the RayCluster and the two training RayJobs
    images = set()
    for where, spec in specs:
        assert spec["rayVersion"] == ray_pin, f"{where}: rayVersion != pyproject's ray {ray_pin}"
        assert spec["authOptions"]["mode"] == "token", f"{where}: token authentication must stay on"
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict)
        for c in _containers(head["template"]):
            assert c["image"], where
            images.add(c["image"])
        assert spec["workerGroupSpecs"], f"{where}: no worker group"
        for g in spec["workerGroupSpecs"]:
            assert g["groupName"] and isinstance(g["rayStartParams"], dict), where
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}/{g['groupName']}: replica bounds"
            for c in _containers(g["template"]):
                assert c["image"], where
                images.add(c["image"])
    assert len(images) == 1, f"Ray pods run different images: {images}"


def test_long_lived_cluster_autoscales_cpu_and_gpu_groups():
    (rc,) = [d for _, d in _docs_of("raycluster.yaml") if d["kind"] == "RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if any(_gpus(c) >= 1 for c in _containers(g["template"]))]
    cpu = [g for g in groups.values() if all(_gpus(c) == 0 for c in _containers(g["template"]))]
    assert gpu and cpu, "need a GPU worker group and a CPU worker group"
    for g in gpu:
        for c in _containers(g["template"]):
            assert int(c["resources"]["requests"].get("nvidia.com/gpu", 0)) == _gpus(c), "GPU request != limit"
    assert all(g["maxReplicas"] > g["minReplicas"] for g in groups.values()), "a group cannot scale"


def _docs_of(name: str) -> list[tuple[Path, dict]]:
    return [(K8S / name, d) for d in _docs(K8S / name)]


def test_rayjobs_have_an_entrypoint_and_a_cluster():
    clusters = {d["metadata"]["name"] for _, d in _all_docs() if d["kind"] == "RayCluster"}
    jobs = [(p, d) for p, d in _all_docs() if d["kind"] == "RayJob"]
    assert {d["metadata"]["name"] for _, d in jobs} >= {"persona-build", "persona-train-stage1", "persona-train-stage2"}
    for p, d in jobs:
        spec = d["spec"]
        assert d["apiVersion"] == "ray.io/v1"
        assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip(), p.name
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), f"{p.name}: exactly one of rayClusterSpec/clusterSelector"
        if "clusterSelector" in spec:
            assert spec["clusterSelector"].get("ray.io/cluster") in clusters, f"{p.name}: selects no RayCluster defined here"
            assert not spec.get("shutdownAfterJobFinishes"), f"{p.name}: must not delete a shared cluster"
        if "runtimeEnvYAML" in spec:
            assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_training_jobs_use_ray_train_on_the_gpus():
    """`persona train --workers N --use-gpu`: N DDP ranks, one GPU each, on a cluster with exactly N GPUs
    in its worker groups; the entrypoint process (the driver) holds none; Ray Train's checkpoints on
    the shared volume every pod mounts."""
    for stage in (1, 2):
        (_, job), = _docs_of(f"rayjob-train-stage{stage}.yaml")
        (argv,) = persona_commands(job["spec"]["entrypoint"])
        assert argv[:2] == ["persona", "train"] and _flag(argv, "--stage") == str(stage)
        args = build_parser().parse_args(argv[1:])
        assert args.workers and args.workers >= 2 and args.use_gpu, f"stage {stage}: not Ray Train on GPUs: {argv}"
        assert "entrypointNumGpus" not in job["spec"], "the driver must not take a GPU a DDP rank needs"
        spec = job["spec"]["rayClusterSpec"]
        groups = spec["workerGroupSpecs"]
        assert all(g["minReplicas"] == g["replicas"] == g["maxReplicas"] for g in groups), "a fixed-size training cluster"
        gpus = sum(g["replicas"] * max(_gpus(c) for c in _containers(g["template"])) for g in groups)
        assert gpus == args.workers, f"stage {stage}: {args.workers} GPU workers on a cluster with {gpus} GPUs"
        storage = args.storage_path or ""
        for t in [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]:
            for c in _containers(t):  # every Ray pod sees the same checkpoints
                mounts = [m for m in c["volumeMounts"] if storage.startswith(m["mountPath"].rstrip("/") + "/")]
                vols = {v["name"]: v for v in t["spec"]["volumes"]}
                assert mounts and "persistentVolumeClaim" in vols[mounts[0]["name"]], f"stage {stage}: {storage} not shared"


def gpu_mismatches(where: str, spec: dict) -> list[str]:
    """Where a Ray node would advertise other GPUs than its pod gets: `rayStartParams.num-gpus` (when
    set) != the containers' nvidia.com/gpu limits, a GPU request != its limit, a GPU pod that does not
    tolerate the GPU nodes' taint."""
    out = []
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, g in groups:
        pod = g["template"]["spec"]
        gpus = sum(_gpus(c) for c in pod["containers"])
        for c in pod["containers"]:
            req = int(c.get("resources", {}).get("requests", {}).get("nvidia.com/gpu", _gpus(c)))
            if req != _gpus(c):
                out.append(f"{where}/{name}/{c['name']}: GPU request {req} != limit {_gpus(c)}")
        declared = (g.get("rayStartParams") or {}).get("num-gpus")
        if declared is not None and int(float(declared)) != gpus:
            out.append(f"{where}/{name}: rayStartParams num-gpus {declared} != pod GPUs {gpus}")
        if gpus and not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
            out.append(f"{where}/{name}: GPU pod without the nvidia.com/gpu toleration")
    return out


def test_gpu_requests_agree_between_ray_and_kubernetes():
    assert [m for where, spec in _cluster_specs() for m in gpu_mismatches(where, spec)] == []
    # the check itself: a copy that advertises two GPUs on a one-GPU pod, and a request below its limit
    (_, rc), = _docs_of("raycluster.yaml")
    bad = copy.deepcopy(rc["spec"])
    (gpu,) = [g for g in bad["workerGroupSpecs"] if g["groupName"] == "gpu"]
    gpu["rayStartParams"]["num-gpus"] = "2"
    gpu["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = 0
    found = gpu_mismatches("copy", bad)
    assert any("num-gpus 2 != pod GPUs 1" in m for m in found) and any("request 0 != limit 1" in m for m in found)


def test_pods_mount_the_shared_volume():
    claims = {d["metadata"]["name"] for _, d in _docs_of("storage.yaml") if d["kind"] == "PersistentVolumeClaim"}
    (_, pvc), = [(p, d) for p, d in _docs_of("storage.yaml") if d["kind"] == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for where, spec in _cluster_specs():
        for tmpl in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
            for c in _containers(tmpl):
                data = [m for m in c["volumeMounts"] if m["mountPath"] == "/app/data"]
                assert data, f"{where}: a Ray container without /app/data"
                assert vols[data[0]["name"]]["persistentVolumeClaim"]["claimName"] in claims


def test_every_persona_command_in_manifests_and_docs_exists():
    checked = 0
    for p, d in _all_docs():
        if d["kind"] == "RayJob":
            cmds = persona_commands(d["spec"]["entrypoint"])
            assert cmds, f"{p.name}: the entrypoint runs no persona command"
            for argv in cmds:
                _check_command(argv, p.name)
                checked += 1
    team = (INFRA.parent / "README.md").read_text().split("## Team deployment", 1)[1].split("\n## ", 1)[0]
    for doc, text in [(p.name, p.read_text()) for p in (INFRA / "README.md", INFRA / "dvc-remote.md")] + [("README.md", team)]:
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for argv in persona_commands(block.replace("\\\n", " ")):
                _check_command(argv, doc)
                checked += 1
    assert checked >= 12


def readme_secrets(text: str) -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl ... create secret generic NAME --from-literal=KEY=...`
    commands in a document's bash blocks."""
    out: dict[str, set[str]] = {}
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "create secret generic" not in line:
                continue
            toks = shlex.split(line, comments=True)
            name = toks[toks.index("generic") + 1]
            out.setdefault(name, set()).update(t.split("=", 2)[1] for t in toks if t.startswith("--from-literal="))
    return out


def secret_refs(node, path: str = "") -> set[tuple[str, str | None]]:
    """(Secret, key) every reference in a manifest reads (key None: the whole Secret, `envFrom`)."""
    out: set[tuple[str, str | None]] = set()
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            out.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
        if "secretRef" in node:
            out.add((node["secretRef"]["name"], None))
        if path.endswith("authOptions") and "secretName" in node:
            out.add((node["secretName"], "auth_token"))  # KubeRay's token Secret
        for k, v in node.items():
            out |= secret_refs(v, f"{path}.{k}")
    elif isinstance(node, list):
        for v in node:
            out |= secret_refs(v, path)
    return out


def test_no_credential_in_the_repository_only_secrets_the_readme_creates():
    created = readme_secrets((INFRA.parent / "README.md").read_text())
    assert set(created) >= {"persona-postgres", "persona-minio", "persona-mlflow-admin", "persona-mlflow-reader",
                            "persona-mlflow-server", "persona-ray-auth"}
    for p in INFRA.rglob("*"):
        if p.is_file():
            assert "change-me" not in p.read_text(errors="replace"), f"{p}: a placeholder credential"
    refs = set()
    for p, d in _all_docs():
        assert d["kind"] != "Secret", f"{p.name}: defines Secret {d['metadata']['name']} (credentials belong in the cluster)"
        refs |= secret_refs(d)
    for name, key in sorted(refs, key=str):
        assert name in created, f"the manifests read Secret {name}, which README.md does not tell the operator to create"
        assert key is None or key in created[name], f"Secret {name}: key {key} is read but not created in README.md"
    # the team-server tests fill exactly these Secrets
    from tests.conftest import S3_KEYS
    from tests.team_server import make_secrets

    made = make_secrets(S3_KEYS)
    mlflow_refs = {n for p, d in _all_docs() if p.name == "mlflow.yaml" for n, _ in secret_refs(d)}
    assert set(made) == mlflow_refs and all(set(made[n]) == created[n] for n in made)
    # and the readme's read-only user is the one the tests check
    (job,) = [d for _, d in _docs_of("mlflow.yaml") if d["kind"] == "Job" and d["metadata"]["name"] == "mlflow-users"]
    assert ("persona-mlflow-reader", "MLFLOW_TRACKING_PASSWORD") in secret_refs(job)


def test_mlflow_stack_wiring():
    docs = [d for _, d in _docs_of("mlflow.yaml")]
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    assert {"mlflow", "minio"} <= set(by_kind["Deployment"]) and "postgres" in by_kind["StatefulSet"]
    assert {"mlflow", "minio", "postgres"} <= set(by_kind["Service"])
    workloads = list(by_kind["Deployment"].values()) + list(by_kind["StatefulSet"].values()) + list(by_kind.get("Job", {}).values())
    configmaps = set(by_kind["ConfigMap"])
    for w in workloads:  # every ConfigMap a pod mounts is defined here
        for v in w["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{w['metadata']['name']}: unknown ConfigMap"
    for name, svc in by_kind["Service"].items():  # every Service selects pods defined here
        sel = svc["spec"]["selector"].items()
        assert any(sel <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads), f"Service {name} selects nothing"
    pod = by_kind["Deployment"]["mlflow"]["spec"]["template"]["spec"]
    (mlflow,) = pod["containers"]
    args = mlflow["args"]
    env = {e["name"]: e for e in mlflow["env"]}
    assert "--app-name=basic-auth" in args and "--serve-artifacts" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    (backend,) = [a.split("=", 1)[1] for a in args if a.startswith("--backend-store-uri=")]
    assert backend.startswith("postgresql:///") and "@" not in backend  # no user, host or password in the URI
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "persona-postgres"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "persona-mlflow-admin"
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio:9000" and env["PGHOST"]["value"] == "postgres"
    ini = by_kind["ConfigMap"]["persona-mlflow-auth"]["data"]["basic_auth.ini"]
    assert "default_permission = READ" in ini and "database_uri = postgresql:///mlflow_auth" in ini
    assert "admin_password" not in ini
    mount = next(m["mountPath"] for m in mlflow["volumeMounts"] if m["name"] == "auth-config")
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == f"{mount}/basic_auth.ini"
    (upgrade,) = pod["initContainers"]
    assert upgrade["args"][:2] == ["db", "upgrade"] and upgrade["args"][2] == backend
    init = by_kind["ConfigMap"]["persona-postgres-init"]["data"]
    assert any("CREATE DATABASE mlflow_auth" in v for v in init.values())
    (pg,) = by_kind["StatefulSet"]["postgres"]["spec"]["template"]["spec"]["containers"]
    assert any(m["mountPath"] == "/docker-entrypoint-initdb.d" for m in pg["volumeMounts"])
    # Ray pods: the tracking server and the admin's credentials, from the Secret
    for where, spec in _cluster_specs():
        for t in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            for c in _containers(t):
                e = {x["name"]: x for x in c["env"]}
                assert e["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000", where
                for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                    assert e[k]["valueFrom"]["secretKeyRef"] == {"name": "persona-mlflow-admin", "key": k}, where


def test_dockerfile_pins_match_pyproject():
    pins = _pins()
    text = (INFRA / "Dockerfile").read_text()
    for pkg in ("torch", "torchvision"):
        found = set(re.findall(rf"(?<![\w-]){pkg}==([\w.+-]+)", text))
        assert found == {pins[pkg]}, f"Dockerfile pins {pkg} {found}, pyproject {pins[pkg]}"
    assert re.search(r"^FROM .*cuda.*runtime", text, flags=re.M | re.I) or "ARG CUDA_IMAGE=nvidia/cuda:" in text
    assert "python3.11" in text and 'ENTRYPOINT ["persona"]' in text
    assert "pyproject.toml" in text  # the rest of the pins come from pyproject itself
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "data", "tests/.cache"} <= set(ignore)
    mlflow = (INFRA / "mlflow.Dockerfile").read_text()
    for pkg in ("mlflow", "psycopg"):  # the server image runs what tests/test_team_mlflow.py ran
        found = set(re.findall(rf"(?<![\w-]){pkg}(?:\[[^\]]*\])?==([\w.+-]+)", mlflow))
        assert found == {pins[pkg]}, f"mlflow.Dockerfile pins {pkg} {found}, pyproject {pins[pkg]}"
    assert "mlflow[auth]==" in mlflow  # the basic-auth app's extra (Flask-WTF)
    import sqlalchemy

    assert f"sqlalchemy=={sqlalchemy.__version__}" in mlflow  # 2.1: postgresql:// means psycopg 3
