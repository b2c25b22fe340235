"""A small English corpus that ships with every Python install: the demo needs no download.

It is the language reference (`pydoc_data.topics`) plus the docstrings of the standard library,
read by parsing the source with `ast`: importing the modules would run their side effects.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

# Third-party code, tests (full of fixture strings), and the IDE/2to3/pip payloads are not prose.
SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "__pycache__",
    "ensurepip",
}


def default_documents() -> Iterator[dict]:
    """Yield the pydoc reference topics, then one document of docstrings per stdlib module."""
    from pydoc_data.topics import topics  # a plain dict literal: importing it runs nothing else

    for name in sorted(topics):
        yield {"text": topics[name], "id": f"pydoc:{name}", "source": "pydoc_data", "meta": {}}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    python = ".".join(map(str, sys.version_info[:3]))
    for path in _stdlib_sources(stdlib):
        text = _module_docstrings(path)
        if text:
            name = path.relative_to(stdlib).as_posix()
            meta = {"python": python}
            yield {"text": text, "id": f"stdlib:{name}", "source": "python-stdlib", "meta": meta}


def write_default_corpus(path: str | Path) -> Path:
    """Write `default_documents()` as JSONL to `path`, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for doc in default_documents():
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _stdlib_sources(stdlib: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(stdlib):
        # Sorting in place makes os.walk itself deterministic, and pruning skips whole subtrees.
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(root, name)


def _module_docstrings(path: Path) -> str:
    """The module, class and function docstrings of one file in source order, blank-line joined."""
    try:
        with warnings.catch_warnings():
            # Old modules trigger SyntaxWarning (invalid escapes) on newer Pythons; irrelevant here.
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):  # ValueError covers undecodable source
        return ""
    docs = [ast.get_docstring(n) for n in [tree, *_definitions(tree.body)]]
    return "\n\n".join(d for d in docs if d)


def _definitions(statements: list[ast.stmt]) -> Iterator[ast.AST]:
    """Classes and functions in source order; only statement lists are walked (much faster than
    ast.walk, which visits every expression node)."""
    for node in statements:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                yield from _definitions(children)


def corpus_or_default(paths: Sequence[str], *, skip_bad: bool = False) -> list[dict]:
    """The user's documents when `paths` are given, else the default corpus (small by design)."""
    from lmforge.data.sources import iter_documents

    return list(iter_documents(paths, skip_bad=skip_bad) if paths else default_documents())
