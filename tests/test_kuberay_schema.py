"""Every RayCluster / RayJob in infra/ against the real KubeRay v1.7.0 CRDs (their openAPIV3Schema).

The CRDs come from the project's shared folder (`shared/kuberay-crds/` beside the repository or
above it; $PERSONA_KUBERAY_CRDS overrides). The schemas do not set `additionalProperties: false`:
the API server drops unknown fields (or, with `kubectl apply`'s default strict field validation,
refuses them), so a misspelt field such as `rayStartParam` would silently do nothing. Here every
object schema that lists `properties` is closed (unknown keys are errors) unless it says
`x-kubernetes-preserve-unknown-fields`; maps (`additionalProperties: {schema}`) stay maps, and
`metadata` (ObjectMeta, checked by the API server itself) stays open. Not checked here: the CRDs'
CEL rules (`x-kubernetes-validations`) and formats such as int32 ranges.
"""
from __future__ import annotations

import copy
import os
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def crd_dir() -> Path | None:
    cands = [os.environ.get("PERSONA_KUBERAY_CRDS", "")] + [str(p / "shared" / "kuberay-crds") for p in REPO.parents]
    for c in cands:
        if c and all((Path(c) / f).is_file() for f in CRD_FILES.values()):
            return Path(c)
    return None


def closed(schema):
    """A copy of a structural schema in which objects with `properties` reject unknown keys."""
    if not isinstance(schema, dict):
        return schema
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: closed(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = closed(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = closed(s["items"])
    for k in ("anyOf", "allOf", "oneOf"):
        if k in s:
            s[k] = [closed(x) for x in s[k]]
    return s


@lru_cache(maxsize=None)
def validator(kind: str, version: str):
    import jsonschema

    folder = crd_dir()
    if folder is None:
        msg = ("KubeRay CRDs not found (shared/kuberay-crds beside or above the repository, or "
               "$PERSONA_KUBERAY_CRDS): manifests NOT checked against the KubeRay schemas")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 2 MB of schema in a second, not ten
    crd = yaml.load((folder / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v["served"], f"{kind} {version} is not served by this KubeRay"
    return jsonschema.Draft4Validator(closed(v["schema"]["openAPIV3Schema"]))  # OpenAPI 3.0 ~ draft 4


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def schema_errors(doc: dict) -> list[str]:
    """'<path>: <what>' for every place `doc` leaves its CRD's schema (unknown fields named by their own path)."""
    group, version = doc["apiVersion"].split("/")
    assert group == "ray.io", doc["apiVersion"]
    out = []
    for e in validator(doc["kind"], version).iter_errors(doc):
        if e.validator == "additionalProperties" and e.validator_value is False:
            known = set(e.schema.get("properties", {}))
            for k in sorted(set(e.instance) - known):
                out.append(f"{_path([*e.absolute_path, k])}: unknown field (known here: {', '.join(sorted(known))})")
        else:
            out.append(f"{_path(e.absolute_path) or '<root>'}: {e.message}")
    return sorted(out)


def ray_docs() -> list[tuple[str, dict]]:
    out = []
    for p in sorted(REPO.joinpath("infra").rglob("*.yaml")):
        for d in yaml.safe_load_all(p.read_text()):
            if isinstance(d, dict) and d.get("kind") in CRD_FILES:
                out.append((f"{p.relative_to(REPO)}:{d['metadata']['name']}", d))
    return out


def test_every_ray_manifest_matches_the_kuberay_crds():
    docs = ray_docs()
    assert {d["kind"] for _, d in docs} == {"RayCluster", "RayJob"} and len(docs) >= 4
    problems = {where: errs for where, d in docs if (errs := schema_errors(d))}
    assert problems == {}, "\n".join(f"{w}: {e}" for w, errs in problems.items() for e in errs)


def _doc(name: str) -> dict:
    (d,) = [d for w, d in ray_docs() if w.endswith(f":{name}")]
    return copy.deepcopy(d)


def test_a_misspelt_field_fails_with_its_path():
    rc = _doc("persona")
    head = rc["spec"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")
    errs = schema_errors(rc)
    assert any(e.startswith("spec.headGroupSpec.rayStartParam: unknown field") for e in errs), errs

    job = _doc("persona-train-stage1")  # deep inside the pod template of the job's own cluster
    c = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    c["resource"] = c.pop("resources")
    job["spec"]["entrypointNumGPUs"] = 1
    errs = schema_errors(job)
    assert "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resource: unknown field" in \
        "\n".join(errs), errs
    assert any(e.startswith("spec.entrypointNumGPUs: unknown field") for e in errs), errs


def test_wrong_types_and_values_fail_with_their_path():
    rc = _doc("persona")
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # rayStartParams are strings
    rc["spec"]["authOptions"]["mode"] = "password"
    errs = "\n".join(schema_errors(rc))
    assert "spec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'" in errs
    assert "spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'" in errs
    assert "spec.authOptions.mode: 'password' is not one of ['disabled', 'token']" in errs
    job = _doc("persona-build")
    job["spec"]["activeDeadlineSeconds"] = "1d"
    assert "spec.activeDeadlineSeconds: '1d' is not of type 'integer'" in schema_errors(job)


def test_closing_keeps_maps_and_preserved_objects_open():
    s = closed({"type": "object", "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "free": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True},
        "list": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}}}}}})
    import jsonschema

    v = jsonschema.Draft4Validator(s)
    assert v.is_valid({"labels": {"any": "x"}, "free": {"b": 1}, "list": [{"n": 1}]})
    assert not v.is_valid({"list": [{"m": 1}]}) and not v.is_valid({"other": 1})
