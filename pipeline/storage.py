"""Where Persona's data lives: local / NFS paths or fsspec URLs (S3-compatible object stores).

`spath(x)` gives a `pathlib.Path` for local paths (and `file://` URLs) and a `RemotePath` for any
other fsspec URL (`s3://bucket/prefix`, `gs://...`, `memory://...`). `RemotePath` implements the
small part of the pathlib API the item stores, stages and shard writer use, so one code path
serves both. Object stores have no rename, but a single PUT is atomic (an object appears whole or
not at all), so `write_bytes` is the atomic write there.

Configuration, read in every process (Ray workers on other nodes get it through the runtime env,
`storage_env()`):
    AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION
        the S3-compatible endpoint (MinIO, Ceph, ...) and credentials, read by botocore;
    PERSONA_STORAGE_OPTIONS
        JSON object of extra fsspec options per protocol, e.g. {"s3": {"anon": false}}.
Listings are never cached (other processes write the same prefixes).
"""
from __future__ import annotations

import fnmatch
import functools
import json
import os
import posixpath
import stat as stat_mod
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs")  # no folders, no rename, listings not cached
STORAGE_ENV_PREFIXES = ("AWS_", "PERSONA_STORAGE_", "FSSPEC_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_")


def protocol_of(url: str | os.PathLike) -> str:
    """'s3://b/k' -> 's3'; local paths and 'file://' -> 'file'."""
    s = os.fspath(url)
    if "://" not in s:
        return "file"
    proto = s.split("://", 1)[0].lower()
    return "file" if proto in ("file", "local") else proto


def is_remote(url: Any) -> bool:
    """True for a RemotePath or a URL whose protocol is not the local filesystem."""
    if isinstance(url, RemotePath):
        return True
    if isinstance(url, Path):
        return False
    return protocol_of(str(url)) != "file"


def storage_options(protocol: str) -> dict:
    """Extra fsspec options for `protocol` from $PERSONA_STORAGE_OPTIONS (JSON), plus no listing cache."""
    raw = os.environ.get("PERSONA_STORAGE_OPTIONS", "").strip()
    opts: dict = {}
    if raw:
        try:
            allopts = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"PERSONA_STORAGE_OPTIONS is not valid JSON: {e}") from e
        if not isinstance(allopts, dict):
            raise ValueError("PERSONA_STORAGE_OPTIONS must be a JSON object {protocol: {option: value}}")
        opts = dict(allopts.get(protocol, {}))
    if protocol in OBJECT_STORES:
        opts.setdefault("use_listings_cache", False)
    return opts


@functools.lru_cache(maxsize=16)
def _filesystem(protocol: str, opts_json: str):
    import fsspec

    try:
        return fsspec.filesystem(protocol, **json.loads(opts_json))
    except (ImportError, ValueError) as e:
        raise RuntimeError(f"cannot open {protocol}:// storage: {e} (for S3 install s3fs)") from e


def filesystem(protocol: str):
    """The (process-cached) fsspec filesystem for `protocol`."""
    return _filesystem(protocol, json.dumps(storage_options(protocol), sort_keys=True))


def storage_env() -> dict[str, str]:
    """The environment variables that configure storage access, to forward to Ray workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


@dataclass(frozen=True)
class RemoteStat:
    st_size: int
    st_mtime_ns: int
    version: str  # ETag / generation / mtime: changes whenever the object is rewritten


class RemotePath:
    """A file or prefix in an fsspec filesystem, with the subset of pathlib that Persona uses."""

    __slots__ = ("protocol", "path")

    def __init__(self, url: str):
        s = str(url)
        self.protocol = protocol_of(s)
        if self.protocol == "file":
            raise ValueError(f"{s!r} is a local path: use pathlib.Path (spath does this)")
        self.path = s.split("://", 1)[1].rstrip("/")

    # ---- naming
    @property
    def fs(self):
        return filesystem(self.protocol)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __lt__(self, other: "RemotePath") -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: str | os.PathLike) -> "RemotePath":
        p = os.fspath(part).strip("/")
        return RemotePath(f"{self}/{p}" if p else str(self))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> "RemotePath":
        head = posixpath.dirname(self.path)
        return RemotePath(f"{self.protocol}://{head or self.path}")

    def as_posix(self) -> str:
        return str(self)

    def relative_to(self, other: "RemotePath") -> Path:
        base = other.path.rstrip("/") + "/"
        if not self.path.startswith(base):
            raise ValueError(f"{self} is not under {other}")
        return Path(self.path[len(base):])

    # ---- queries
    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def stat(self) -> RemoteStat:
        return _remote_stat(self.fs.info(self.path))

    def iterdir(self) -> Iterator["RemotePath"]:
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return iter(())
        return iter(sorted(RemotePath(f"{self.protocol}://{n.rstrip('/')}") for n in names
                           if n.rstrip("/") != self.path))

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        """Files in this folder matching `pattern` ('*.tar'); '**/' patterns search recursively."""
        recursive = pattern.startswith("**/")
        pat = pattern[3:] if recursive else pattern
        if recursive:
            found = self.fs.find(self.path)
        else:
            try:
                found = self.fs.ls(self.path, detail=False)
            except FileNotFoundError:
                found = []
        out = sorted(RemotePath(f"{self.protocol}://{n}") for n in found
                     if fnmatch.fnmatch(posixpath.basename(n.rstrip("/")), pat))
        return iter(out)

    def rglob(self, pattern: str) -> Iterator["RemotePath"]:
        return self.glob("**/" + pattern)

    # ---- reads / writes
    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """One PUT: the object appears whole or not at all."""
        self.fs.pipe_file(self.path, bytes(data))
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb", **kw) -> IO:
        return self.fs.open(self.path, mode, **kw)

    def put_file(self, local: str | os.PathLike) -> None:
        """Upload a local file here (one object; multipart uploads become visible on completion)."""
        self.fs.put_file(os.fspath(local), self.path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a prefix exists once an object is under it. No-op there."""
        if self.protocol in OBJECT_STORES:
            return
        self.fs.makedirs(self.path, exist_ok=True)

    def unlink(self, missing_ok: bool = False) -> None:
        """Delete the object (object stores delete missing keys silently: checked first here)."""
        if not self.fs.exists(self.path):
            if missing_ok:
                return
            raise FileNotFoundError(str(self))
        self.fs.rm_file(self.path)


def _remote_stat(info: dict) -> RemoteStat:
    size = int(info.get("size") or 0)
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created")
    if hasattr(mtime, "timestamp"):
        ns = int(mtime.timestamp() * 1e9)
    elif isinstance(mtime, (int, float)):
        ns = int(float(mtime) * 1e9)
    else:
        ns = 0
    version = str(info.get("ETag") or info.get("etag") or info.get("generation") or info.get("md5Hash") or ns).strip('"')
    return RemoteStat(size, ns, version)


def spath(p: "str | os.PathLike | RemotePath") -> "Path | RemotePath":
    """Local path or file:// URL -> pathlib.Path; any other fsspec URL -> RemotePath."""
    if isinstance(p, (Path, RemotePath)):
        return p
    s = os.fspath(p)
    if is_remote(s):
        return RemotePath(s)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return Path(s)


def list_files(root: "Path | RemotePath", recursive: bool = True,
               special: bool = False) -> list[tuple[str, "Path | RemotePath", int, str]]:
    """Files under `root` as sorted (relpath, path, size, version) tuples; version changes when the
    file is rewritten (local: mtime in ns; object stores: the ETag). With `special`, entries that are
    neither regular files nor folders (FIFOs, sockets, devices, broken links) are listed too, with
    size -1 and version `special:<kind>` (they are never opened). Local names that are not valid
    UTF-8 come as Python does (surrogate escapes)."""
    out = []
    if isinstance(root, RemotePath):
        fs = root.fs
        if recursive:
            found = fs.find(root.path, detail=True)
        else:
            found = {i["name"]: i for i in fs.ls(root.path, detail=True) if i.get("type") == "file"}
        base = root.path.rstrip("/") + "/"
        for name, info in found.items():
            if info.get("type", "file") != "file" or not name.startswith(base):
                continue
            st = _remote_stat(info)
            out.append((name[len(base):], RemotePath(f"{root.protocol}://{name}"), st.st_size, st.version))
    else:
        files = root.rglob("*") if recursive else root.glob("*")
        for f in files:
            try:
                st = f.stat()
            except OSError:
                if special and f.is_symlink():
                    out.append((f.relative_to(root).as_posix(), f, -1, "special:broken_link"))
                continue
            if stat_mod.S_ISDIR(st.st_mode):
                continue
            if not stat_mod.S_ISREG(st.st_mode):
                if special:
                    kind = ("fifo" if stat_mod.S_ISFIFO(st.st_mode) else "socket" if stat_mod.S_ISSOCK(st.st_mode)
                            else "device")
                    out.append((f.relative_to(root).as_posix(), f, -1, f"special:{kind}"))
                continue
            out.append((f.relative_to(root).as_posix(), f, st.st_size, str(st.st_mtime_ns)))
    out.sort(key=lambda t: t[0])
    return out


def display_name(s: str) -> str:
    """A name as valid UTF-8 text: bytes that are not UTF-8 (surrogate escapes) become U+FFFD."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def raw_name(s: str) -> bytes | None:
    """The exact bytes of a local name that is not valid UTF-8 (None when it is)."""
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(s)


def cache_root() -> Path:
    """Local folder for copies of remote files: $PERSONA_CACHE, else ~/.cache/persona."""
    return Path(os.environ.get("PERSONA_CACHE") or Path.home() / ".cache" / "persona")


def local_copy(url: "str | os.PathLike | RemotePath", cache: "str | os.PathLike | None" = None) -> Path:
    """A local path with `url`'s bytes: the path itself when local; otherwise a copy downloaded once
    into `cache` (default `cache_root()/remote`), named by (url, ETag/version), written atomically,
    so a rewritten object is fetched again and concurrent readers never see a partial file."""
    p = spath(url)
    if not isinstance(p, RemotePath):
        return p
    import hashlib
    import tempfile

    st = p.stat()
    tag = hashlib.sha256(f"{p}\x00{st.version}\x00{st.st_size}".encode()).hexdigest()[:24]
    dest = Path(cache or cache_root() / "remote") / f"{tag}-{p.name}"
    if dest.is_file() and dest.stat().st_size == st.st_size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        p.fs.get_file(p.path, tmp)
        if os.path.getsize(tmp) != st.st_size:
            raise IOError(f"{p}: downloaded {os.path.getsize(tmp)} bytes, expected {st.st_size}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
