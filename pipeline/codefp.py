"""Code fingerprints: the part of a cache key that changes when the code that shapes a result changes.

`code_fingerprint("stages.align")` hashes the module and every project module it imports, directly or
through others, at any depth (imports inside functions included: they are read from the source, not
from what happens to be loaded). A project module is one whose top-level package lies beside the
starting one's (the repository root: `pipeline/`, `stages/`, `training/`), so installed libraries are
left out (their versions are pinned in pyproject.toml). Each file is hashed by its syntax tree without
docstrings: comments, docstrings and formatting change nothing, any change to the code does.

`import_closure` lists those files (tests check that dvc.yaml's `deps` cover them).
Dynamic imports (`importlib.import_module(name)`) are not followed.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path

_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_CACHE: dict[tuple[str, int, int], tuple[str, tuple]] = {}  # (path, size, mtime) -> (fp, raw imports)


def _module_file(root: Path, name: str) -> Path | None:
    """The source file of module `name` under `root` (package -> its __init__.py), or None."""
    base = root.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _root_of(module: str) -> Path:
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None and not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"cannot find module '{top}'")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve().parent
    return Path(spec.origin).resolve().parent


def _raw_imports(tree: ast.AST) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    """(level, module, names) of every import statement; `import a.b` is (0, "a.b", ())."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(0, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or "", tuple(a.name for a in node.names if a.name != "*")))
    return tuple(out)


def _imported_names(raw: tuple[tuple[int, str, tuple[str, ...]], ...], name: str, is_package: bool) -> set[str]:
    """Module names imported by module `name` (with the candidate submodules of `from X import y`)."""
    out: set[str] = set()
    pkg = name if is_package else name.rpartition(".")[0]
    for level, module, names in raw:
        if level:
            parts = pkg.split(".") if pkg else []
            if level > 1:
                parts = parts[: len(parts) - (level - 1)]
            base = ".".join(parts + ([module] if module else []))
        else:
            base = module
        if base:
            out.add(base)
        out.update(f"{base}.{n}" if base else n for n in names)
    return out


def import_closure(module: str) -> list[Path]:
    """Source files of `module` and of every project module it imports, transitively, sorted.
    Each module's parent packages (their `__init__.py`, which importing it runs) are included."""
    root = _root_of(module)
    tops = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()} | {
        p.stem for p in root.glob("*.py")}
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in tops:
            continue
        f = _module_file(root, name)
        if f is None:  # `from pkg import function`: not a module
            continue
        seen[name] = f
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(_imported_names(_analyse(f)[1], name, f.name == "__init__.py"))
    return sorted(set(seen.values()))


def _analyse(f: Path) -> tuple[str, tuple]:
    """(fingerprint, raw import statements) of one file, cached per (path, size, mtime)."""
    st = f.stat()
    ck = (str(f), st.st_size, st.st_mtime_ns)
    if ck not in _CACHE:
        tree = ast.parse(f.read_bytes(), filename=str(f))
        imports = _raw_imports(tree)
        fp = hashlib.sha256(ast.dump(_strip_docstrings(tree), annotate_fields=True,
                                     include_attributes=False).encode()).hexdigest()
        _CACHE[ck] = (fp, imports)
    return _CACHE[ck]


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, _DOC_OWNERS) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def source_fingerprint(path: str | Path) -> str:
    """sha256 of a Python file's syntax tree without docstrings (comments/formatting don't count)."""
    return _analyse(Path(path))[0]


def code_fingerprint(module: str, length: int = 16) -> str:
    """Fingerprint of `module`'s code and of every project module it imports (see the module doc)."""
    root = _root_of(module)
    h = hashlib.sha256()
    for f in import_closure(module):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(b"\x00")
        h.update(source_fingerprint(f).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]
