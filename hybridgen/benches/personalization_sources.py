"""Local text the personalization bench's users are made of, one reader per source.

Each reader returns `Documents` (name, text) from text already on the machine, so the bench
needs no network: CPython's pydoc topics (the language reference), `/usr/share/doc/*/NEWS*`
(release notes), `/usr/share/common-licenses`, the installed packages' METADATA long
descriptions (READMEs), `git` man pages, the coreutils info manual, the standard library's
`asyncio` source and `email` docstrings, and the `textual` widgets' source (`REAL_SOURCES`,
one user each). `GENERIC_SOURCES` are sources no user has, for generic held-out text. Each
document is cleaned, cut to `MAX_DOC_CHARS` and kept once.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import sysconfig
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from models.lab.corpus import clean_text, iter_info, iter_licenses, iter_python_topics, roff_to_text

#: Characters of a document read at most (one long file is no more than a few samples anyway).
MAX_DOC_CHARS = 24_000

Documents = list[tuple[str, str]]  # (document name, text), sorted by name


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _purelib() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file()) if root.is_dir() else []


def _unique(documents: Iterable[tuple[str, str]]) -> Documents:
    """Documents with at least 400 characters, each text once (packages share NEWS files)."""
    seen: set[str] = set()
    kept = []
    for name, text in documents:
        text = clean_text(text)[:MAX_DOC_CHARS]
        digest = hashlib.sha256(text.encode()).hexdigest()
        if len(text) >= 400 and digest not in seen:
            seen.add(digest)
            kept.append((name, text))
    return sorted(kept)


def _docstrings(path: Path) -> str:
    """A module's docstrings with their signatures (the module's API documentation)."""
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    parts = [doc] if (doc := ast.get_docstring(tree)) else []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            doc = ast.get_docstring(node)
            if doc and not node.name.startswith("_"):
                header = (
                    f"class {node.name}:"
                    if isinstance(node, ast.ClassDef)
                    else f"def {node.name}({ast.unparse(node.args)}):"
                )
                parts.append(f"{header}\n    " + doc.replace("\n", "\n    "))
    return "\n\n".join(parts)


def python_reference() -> Documents:
    """CPython's pydoc help topics: excerpts of the Python language reference."""
    return _unique((d.name, d.text) for d in iter_python_topics())


def release_notes() -> Documents:
    """Release notes: the NEWS files under /usr/share/doc, one per package."""
    root = Path("/usr/share/doc")
    return _unique((p.parent.name, _read(p)) for p in _files(root, "*/NEWS*"))


def licenses() -> Documents:
    """Licence texts of /usr/share/common-licenses."""
    return _unique((d.name, d.text) for d in iter_licenses())


def package_readmes() -> Documents:
    """Long descriptions (READMEs) in the installed packages' METADATA files."""
    documents = []
    for dist in sorted(metadata.distributions(), key=lambda d: str(d.metadata["Name"])):
        name = str(dist.metadata["Name"])
        text = dist.read_text("METADATA") or ""
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        if name != "hybridgen":
            documents.append((name, body))
    return _unique(documents)


def git_man_pages() -> Documents:
    """The git man pages (section 1), roff turned into text."""
    return _unique(
        (p.name.removesuffix(".gz"), roff_to_text(_read(p)))
        for p in _files(Path("/usr/share/man/man1"), "git*.1*")
    )


def coreutils_manual() -> Documents:
    """The GNU coreutils info manual, one document per node."""
    return _unique((d.name, d.text) for d in iter_info() if d.name.startswith("coreutils."))


def asyncio_source() -> Documents:
    """The standard library's asyncio package, source code."""
    return _unique((p.name, _read(p)) for p in _files(_stdlib() / "asyncio", "*.py"))


def email_docstrings() -> Documents:
    """The standard library's email package, docstrings and signatures."""
    return _unique(
        (str(p.relative_to(_stdlib())), _docstrings(p))
        for p in _files(_stdlib() / "email", "**/*.py")
    )


def textual_widgets_source() -> Documents:
    """The textual package's widgets, source code."""
    return _unique((p.name, _read(p)) for p in _files(_purelib() / "textual" / "widgets", "*.py"))


#: name -> (kind, description, reader) of each real-text user, in report order.
REAL_SOURCES: dict[str, tuple[str, str, Callable[[], Documents]]] = {
    "python-reference": ("prose", "CPython pydoc_data.topics (language reference)",
                         python_reference),
    "release-notes": ("prose", "/usr/share/doc/*/NEWS*", release_notes),
    "licenses": ("prose", "/usr/share/common-licenses", licenses),
    "package-readmes": ("prose", "site-packages */METADATA long descriptions", package_readmes),
    "git-man": ("docs", "/usr/share/man/man1/git*.1.gz", git_man_pages),
    "coreutils-info": ("docs", "/usr/share/info/coreutils.info.gz nodes", coreutils_manual),
    "email-docstrings": ("docs", "stdlib email/**/*.py docstrings", email_docstrings),
    "asyncio-source": ("code", "stdlib asyncio/*.py source", asyncio_source),
    "textual-source": ("code", "site-packages textual/widgets/*.py source",
                       textual_widgets_source),
}  # fmt: skip


def generic_stdlib_docstrings() -> Documents:
    """Docstrings of standard-library packages no user has (http, logging, json, xml.dom)."""
    root = _stdlib()
    files = [p for package in ("http", "logging", "json", "xml/dom") for p in
             _files(root / package, "*.py")]  # fmt: skip
    return _unique((str(p.relative_to(root)), _docstrings(p)) for p in files)


def generic_man5() -> Documents:
    """Man pages of section 5 (file formats)."""
    return _unique(
        (p.name.removesuffix(".gz"), roff_to_text(_read(p)))
        for p in _files(Path("/usr/share/man/man5"), "*.5*")
    )


def generic_info() -> Documents:
    """GNU info manuals other than coreutils (diffutils, find, ...)."""
    return _unique((d.name, d.text) for d in iter_info() if not d.name.startswith("coreutils."))


def generic_pydantic() -> Documents:
    """The pydantic package's source."""
    return _unique((p.name, _read(p)) for p in _files(_purelib() / "pydantic", "*.py"))


#: Generic held-out text: sources that no user has.
GENERIC_SOURCES: dict[str, Callable[[], Documents]] = {
    "stdlib-docstrings(http,logging,json,xml.dom)": generic_stdlib_docstrings,
    "man5": generic_man5,
    "info(not coreutils)": generic_info,
    "pydantic-source": generic_pydantic,
}
