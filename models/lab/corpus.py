"""A deterministic training corpus from text already on the machine (no downloads).

Sources (each a named, domain-tagged stream of documents):

- `man`: English man pages (`/usr/share/man/man1..8`, roff turned into plain text),
- `info`: GNU info manuals (`/usr/share/info`, one document per node),
- `licenses`: `/usr/share/common-licenses`,
- `python-topics`: CPython's `pydoc_data.topics` (the language reference help topics),
- `python-docstrings`: docstrings and signatures of the standard library, read with `ast`.

The edge model is a specialist on its *domain* (default: the system and command-line
documentation `man`, `info`, `licenses`); the cloud model trains on every source. Each source
is read up to a byte budget in a fixed, hash-defined file order, and documents are assigned to
train or held-out by a hash of their name, so the same machine and budget give the same corpus.
When the domain's sources are missing (a container without man/info pages) the domain falls
back to `python-topics` and the manifest records why.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import logging
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SOURCES = ("man", "info", "licenses", "python-topics", "python-docstrings")
DEFAULT_DOMAIN = ("man", "info", "licenses")
FALLBACK_DOMAIN = ("python-topics",)
MAN_ROOT = Path("/usr/share/man")
INFO_ROOT = Path("/usr/share/info")
LICENSES_ROOT = Path("/usr/share/common-licenses")
#: Documents longer than this are cut, so one huge page cannot dominate a split.
MAX_DOC_CHARS = 24_000
MIN_DOC_CHARS = 80

_TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "--",
        "\u2022": "*",
        "\u00a0": " ",
        "\u2026": "...",
    }
)


@dataclass(frozen=True)
class Document:
    """One cleaned document. `name` is stable across machines with the same files."""

    source: str
    name: str
    text: str
    held_out: bool = False

    @property
    def split_key(self) -> int:
        """Stable hash deciding the split: about 1 document in 20 is held out."""
        return _stable_hash(f"{self.source}/{self.name}")


@dataclass
class Corpus:
    """Documents split by domain and held-out flag, plus the statistics for the manifest."""

    domain: tuple[str, ...]
    documents: list[Document]
    stats: dict[str, Any] = field(default_factory=dict)

    def chat_texts(self, *, in_domain: bool | None = None) -> list[str]:
        """Chat-formatted question/answer examples made from the training documents."""
        examples = (
            chat_example(d)
            for d in self.documents
            if not d.held_out and (in_domain is None or (d.source in self.domain) == in_domain)
        )
        return [e for e in examples if e]

    def texts(self, *, in_domain: bool | None = None, held_out: bool) -> list[str]:
        """Document texts of one split; `in_domain` None means both domains."""
        return [
            d.text
            for d in self.documents
            if d.held_out == held_out
            and (in_domain is None or (d.source in self.domain) == in_domain)
        ]


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def clean_text(text: str) -> str:
    """Normalize typography and whitespace: ASCII quotes/dashes, no control characters,
    no trailing spaces, at most two consecutive blank lines."""
    text = text.translate(_TYPOGRAPHY)
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# --- roff (man pages) ---------------------------------------------------------------------

_ROFF_CHARS = {
    "em": "--", "en": "-", "hy": "-", "bu": "*", "aq": "'", "dq": '"', "lq": '"', "rq": '"',
    "oq": "'", "cq": "'", "co": "(c)", "rg": "(R)", "tm": "(TM)", "mi": "-", "pl": "+",
    "mu": "x", "<=": "<=", ">=": ">=", "->": "->", "<-": "<-", "ti": "~", "ha": "^",
    "rs": "\\", "ga": "`", "ul": "_", "sl": "/", "fo": "<<", "fc": ">>", "Fo": "<<", "Fc": ">>",
}  # fmt: skip
_ROFF_ESCAPE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\([A-Za-z0-9]{2}|[A-Za-z0-9])"  # font changes
    r"|s[+-]?(?:\d+|\[[^\]]*\]|\(\d\d)"  # size changes
    r"|\((?P<c2>..)"  # \(xx special character
    r"|\[(?P<cn>[^\]]*)\]"  # \[name] special character
    r"|\*(?:\(..|\[[^\]]*\]|.)"  # string interpolation
    r"|[nk](?:\(..|\[[^\]]*\]|.)"  # number registers / marks
    r"|[hvwlLxDbo](?:'[^']*')"  # drawing / motions
    r"|(?P<lit>[-e&|^%c:/,!ntdu0 ~.'`\\\"])"  # single-character escapes
    r")"
)
_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}
_INLINE = {"B", "I", "SM", "SB", "UR", "MT", "OP", "Nm", "Ar", "Fl", "Cm", "Pa", "Nd"}
_BREAKS = {"PP", "LP", "P", "TP", "IP", "sp", "br", "HP", "RS", "RE", "Sh", "Pp"}
_SINGLE = {"e": "\\", "-": "-", "~": " ", " ": " ", "0": " ", "'": "'", "`": "`", "\\": "\\"}


def _roff_escapes(line: str) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group("c2"):
            return _ROFF_CHARS.get(match.group("c2"), "")
        if match.group("cn") is not None:
            return _ROFF_CHARS.get(match.group("cn"), "")
        lit = match.group("lit")
        if lit is not None:
            return _SINGLE.get(lit, "")
        return ""

    if '\\"' in line:  # comment to end of line
        line = line.split('\\"', 1)[0]
    return _ROFF_ESCAPE.sub(replace, line)


def _macro_args(rest: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]


def roff_to_text(roff: str) -> str:
    """Turn a man page's roff source into readable plain text (good enough for training)."""
    out: list[str] = []
    skipping_definition = False
    for raw in roff.splitlines():
        if skipping_definition:
            if raw.startswith(".."):
                skipping_definition = False
            continue
        if raw.startswith((".", "'")):
            name, _, rest = raw[1:].strip().partition(" ")
            if name in ("de", "de1", "ig", "am"):
                skipping_definition = True
            elif name in ("SH", "SS", "Sh", "Ss"):
                out.extend(["", _roff_escapes(" ".join(_macro_args(rest))).upper(), ""])
            elif name == "TH":
                args = _macro_args(rest)
                if args:
                    out.append(
                        _roff_escapes(args[0]).lower() + (f"({args[1]})" if len(args) > 1 else "")
                    )
            elif name in _ALTERNATING:
                out.append(_roff_escapes("".join(_macro_args(rest))))
            elif name in _INLINE:
                out.append(_roff_escapes(" ".join(_macro_args(rest))))
            elif name in _BREAKS:
                out.append("")
                args = _macro_args(rest)
                if name == "IP" and args:
                    out.append(_roff_escapes(args[0]))
            continue
        out.append(_roff_escapes(raw))
    # Join the filled paragraphs back into lines; keep blank lines as paragraph breaks.
    paragraphs = re.split(r"\n\s*\n", "\n".join(out))
    joined = [" ".join(p.split()) for p in paragraphs]
    return "\n\n".join(p for p in joined if p)


# --- sources ------------------------------------------------------------------------------


def _ordered(paths: list[Path], root: Path) -> list[Path]:
    """A fixed pseudo-random order (by hash of the relative path) for budgeted reading."""
    return sorted(paths, key=lambda p: _stable_hash(str(p.relative_to(root))))


def _read_maybe_gz(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


#: At most this many pages per command family (`git-*`, `gcloud_*`, ...): some packages ship
#: thousands of near-identical generated pages that would otherwise swamp the domain.
MAX_PAGES_PER_FAMILY = 8


def _man_family(name: str) -> str:
    return re.split(r"[-_.]", name, maxsplit=1)[0].lower()


def iter_man(root: Path = MAN_ROOT) -> Iterator[Document]:
    """English man pages (sections 1-8), `.so` redirections skipped, families capped."""
    pages = [
        p for section in sorted(root.glob("man[1-8]")) for p in section.iterdir() if p.is_file()
    ]
    per_family: dict[str, int] = {}
    for path in _ordered(pages, root):
        family = _man_family(path.name)
        if per_family.get(family, 0) >= MAX_PAGES_PER_FAMILY:
            continue
        per_family[family] = per_family.get(family, 0) + 1
        try:
            roff = _read_maybe_gz(path)
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        if roff.lstrip().startswith(".so ") and roff.count("\n") <= 2:
            continue
        name = path.name.removesuffix(".gz")
        yield Document("man", name, clean_text(roff_to_text(roff)))


def iter_info(root: Path = INFO_ROOT) -> Iterator[Document]:
    """GNU info manuals, one document per node; indexes and tag tables skipped."""
    files = [p for p in root.glob("*.info*") if p.is_file()]
    for path in _ordered(files, root):
        try:
            text = _read_maybe_gz(path)
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        for number, node in enumerate(text.split("\x1f")):
            lines = node.strip("\n").splitlines()
            if not lines or lines[0].startswith(("Tag Table:", "Indirect:", "Local Variables")):
                continue
            header = lines[0]
            if header.startswith("File:") and "Index" in header.split("Node:", 1)[-1].split(",")[0]:
                continue
            body = "\n".join(lines[1:] if header.startswith("File:") else lines)
            yield Document("info", f"{path.name}#{number}", clean_text(body))


def iter_licenses(root: Path = LICENSES_ROOT) -> Iterator[Document]:
    """Licence texts from /usr/share/common-licenses (links to the same text read once)."""
    seen: set[Path] = set()
    for path in sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []:
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        yield Document("licenses", path.name, clean_text(_read_maybe_gz(path)))


def iter_python_topics() -> Iterator[Document]:
    """CPython's pydoc help topics (language reference excerpts)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without pydoc_data
        return
    for name in sorted(topics):
        yield Document("python-topics", name, clean_text(topics[name]))


#: Folders without useful prose (tests, generated codecs, pydoc_data is its own source).
_SKIP_STDLIB = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                "turtledemo", "ensurepip", "__pycache__", "encodings", "pydoc_data"}  # fmt: skip
_MAX_SOURCE_FILE_BYTES = 150_000


def _docstring_document(tree: ast.Module, module: str) -> str:
    parts = [f"# module {module}"]
    if doc := ast.get_docstring(tree):
        parts.append(doc)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            doc = ast.get_docstring(node)
            if not doc or node.name.startswith("_"):
                continue
            if isinstance(node, ast.ClassDef):
                header = f"class {node.name}:"
            else:
                header = f"def {node.name}({ast.unparse(node.args)}):"
            parts.append(f"{header}\n    " + doc.replace("\n", "\n    "))
    return "\n\n".join(parts)


def iter_python_docstrings() -> Iterator[Document]:
    """Docstrings (with signatures) of the pure-Python standard library, one per module."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not _SKIP_STDLIB.intersection(p.relative_to(root).parts[:-1])
        and not p.name.startswith("test_")
        and not p.relative_to(root).parts[0].startswith("config-")
        and p.stat().st_size <= _MAX_SOURCE_FILE_BYTES
    ]
    for path in _ordered(files, root):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, OSError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        yield Document("python-docstrings", module, clean_text(_docstring_document(tree, module)))


READERS = {
    "man": iter_man,
    "info": iter_info,
    "licenses": iter_licenses,
    "python-topics": iter_python_topics,
    "python-docstrings": iter_python_docstrings,
}


def read_source(source: str, budget_bytes: int) -> list[Document]:
    """Documents of `source` in their fixed order until `budget_bytes` of text are read."""
    documents: list[Document] = []
    total = 0
    for document in READERS[source]():
        text = document.text[:MAX_DOC_CHARS]
        if len(text) < MIN_DOC_CHARS:
            continue
        documents.append(Document(document.source, document.name, text))
        total += len(text.encode())
        if total >= budget_bytes:
            break
    return documents


def _split(docs: list[Document]) -> list[Document]:
    """Hold out ~1 in 20 documents by hash; at least one when a source has two or more."""
    keys = [d.split_key for d in docs]
    held = [k % 20 == 0 for k in keys]
    if len(docs) >= 2 and not any(held):
        held[min(range(len(docs)), key=lambda i: keys[i] % 20)] = True
    return [Document(d.source, d.name, d.text, h) for d, h in zip(docs, held, strict=True)]


def build_corpus(
    budgets: dict[str, int], domain: tuple[str, ...] = DEFAULT_DOMAIN, *, min_domain_bytes: int = 0
) -> Corpus:
    """Read every source within its byte budget and tag the edge's domain.

    Args:
        budgets: bytes of cleaned text to read per source (a missing source reads nothing).
        domain: the sources the edge specialises in; the others are "out of domain".
        min_domain_bytes: when the domain's sources give less than this (e.g. no man/info
            pages installed), fall back to FALLBACK_DOMAIN and record it in `stats`.

    Raises:
        ValueError: unknown source name, or no usable text at all.
    """
    unknown = [s for s in (*budgets, *domain) if s not in READERS]
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; known: {', '.join(SOURCES)}")
    documents: list[Document] = []
    per_source: dict[str, dict[str, int]] = {}
    for source, budget in budgets.items():
        docs = _split(read_source(source, budget) if budget > 0 else [])
        documents.extend(docs)
        per_source[source] = {
            "documents": len(docs),
            "bytes": sum(len(d.text.encode()) for d in docs),
            "held_out_documents": sum(d.held_out for d in docs),
        }
        logger.info(
            "corpus source %s: %d documents, %d bytes",
            source,
            len(docs),
            per_source[source]["bytes"],
        )
    stats: dict[str, Any] = {"sources": per_source, "requested_domain": list(domain)}
    domain_bytes = sum(per_source.get(s, {}).get("bytes", 0) for s in domain)
    if domain_bytes < max(min_domain_bytes, 1):
        stats["domain_fallback"] = (
            f"only {domain_bytes} bytes from {', '.join(domain)} (man/info pages not installed?); "
            f"edge domain falls back to {', '.join(FALLBACK_DOMAIN)}"
        )
        logger.warning("corpus: %s", stats["domain_fallback"])
        domain = FALLBACK_DOMAIN
    if not any(d.source in domain for d in documents) or all(d.source in domain for d in documents):
        raise ValueError("corpus needs text both inside and outside the edge's domain")
    corpus = Corpus(domain=tuple(domain), documents=documents, stats=stats)
    stats["domain"] = list(domain)
    for split in ("train", "held_out"):
        for in_domain in (True, False):
            texts = corpus.texts(in_domain=in_domain, held_out=split == "held_out")
            key = f"{split}_{'in' if in_domain else 'out_of'}_domain_bytes"
            stats[key] = sum(len(t.encode()) for t in texts)
    return corpus


# --- chat examples ------------------------------------------------------------------------

_MAX_ANSWER_CHARS = 480


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _is_underline(paragraph: str) -> bool:
    return bool(re.fullmatch(r"[*=\-.]+", paragraph.splitlines()[-1].strip()))


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= _MAX_ANSWER_CHARS:
        return text
    cut = text[:_MAX_ANSWER_CHARS]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > 80 else cut.rsplit(" ", 1)[0] + " ..."


def _prose(paragraphs: list[str]) -> str | None:
    """The first paragraph that reads like prose (not a heading, table or code)."""
    for paragraph in paragraphs:
        if _is_underline(paragraph) or paragraph.startswith(("+-", "|", ">>>", "def ", "class ")):
            continue
        if len(paragraph) >= 40 and paragraph[0].isalpha():
            return paragraph
    return None


def _question_answer(document: Document) -> tuple[str, str] | None:
    paragraphs = _paragraphs(document.text)
    if len(paragraphs) < 2:
        return None
    if document.source == "man":
        if "NAME" not in paragraphs:
            return None
        index = paragraphs.index("NAME")
        if index + 1 >= len(paragraphs) or " - " not in paragraphs[index + 1]:
            return None
        name_line = paragraphs[index + 1]
        command = name_line.split(" - ", 1)[0].split(",")[0].strip()
        rest = (
            paragraphs[paragraphs.index("DESCRIPTION") + 1 :] if "DESCRIPTION" in paragraphs else []
        )
        detail = _prose(rest)
        answer = name_line + (f". {detail}" if detail else "")
        return f"What does {command} do?", answer
    if document.source == "info":
        heading = paragraphs[0].splitlines()[0].strip()
        if heading.startswith(("This is", "File:")) or len(heading) > 80:
            return None
        topic = re.sub(r"^[0-9.]+\s+", "", heading)
        manual = document.name.split(".info", 1)[0]
        prose = _prose(paragraphs[1:])
        return (f"Tell me about {topic} in {manual}.", prose) if prose else None
    if document.source == "licenses":
        return f"What does the {document.name} licence say?", _prose(paragraphs) or paragraphs[0]
    if document.source == "python-topics":
        prose = _prose(paragraphs[1:])
        return (f"Explain {document.name} in Python.", prose) if prose else None
    if document.source == "python-docstrings":
        prose = _prose(paragraphs[1:2])
        return (f"What is the Python module {document.name} for?", prose) if prose else None
    return None


def chat_example(document: Document) -> str | None:
    """One chat-formatted exchange (`models.chat` format) drawn from a document, or None."""
    from models.chat import render_chat

    pair = _question_answer(document)
    if pair is None:
        return None
    question, answer = pair
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": _shorten(answer)},
    ]
    return render_chat(messages, add_generation_prompt=False)
