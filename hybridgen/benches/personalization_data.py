"""Users of `hybridgen bench personalization`, built from text already on the machine.

Each real-text user is one coherent source (one package's docs, one kind of document), read
in sorted file order; its documents are shuffled with a fixed seed and split BY DOCUMENT: the
first documents give the held-out samples, the next ones the feedback samples, so no held-out
sample shares a document with the feedback. A sample is a run of `sample_tokens` consecutive
tokens of one document (at most a few per document, so one long file cannot be a whole user).

Chat-persona users are sentences from templates in one fixed style and vocabulary; feedback and
held-out samples come from different fillings (two seeds, and no held-out sentence is also a
feedback sentence). Generic text comes from sources no user has.

Sources (no network): CPython's pydoc topics (the language reference), `/usr/share/doc/*/NEWS*`
(release notes), `/usr/share/common-licenses`, the installed packages' METADATA long
descriptions (READMEs), `git` man pages, the coreutils info manual, the standard library's
`asyncio` source and `email` docstrings, and the `textual` widgets' source. A source that is
missing on this machine is skipped (the JSON lists the users actually built).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import random
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from models.corpus import clean_text, iter_info, iter_licenses, iter_python_topics, roff_to_text

#: Characters of a document read at most (one long file is no more than a few samples anyway).
MAX_DOC_CHARS = 24_000
#: At most this many samples from one document, held-out and feedback alike (relaxed only when
#: a source has too few documents).
MAX_SAMPLES_PER_DOC = 4
SEED = 11

Documents = list[tuple[str, str]]  # (document name, text), sorted by name
Encode = Callable[[str], list[int]]


@dataclass
class User:
    """One user of the bench: its feedback and held-out samples (token ids) and provenance."""

    name: str
    kind: str  # "prose", "docs", "code" or "persona"
    source: str
    feedback: list[list[int]] = field(default_factory=list)
    held_out: list[list[int]] = field(default_factory=list)
    feedback_documents: list[str] = field(default_factory=list)
    held_out_documents: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- local text sources


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


# ---------------------------------------------------------------------- samples


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]


def split_samples(
    documents: Documents,
    encode: Encode,
    *,
    feedback: int,
    held_out: int,
    sample_tokens: int,
    seed: int = SEED,
) -> tuple[list[list[int]], list[list[int]], list[str], list[str]]:
    """Held-out and feedback samples from disjoint documents.

    The documents are shuffled with `seed`; the first ones fill the held-out samples, the
    rest the feedback samples, at most `MAX_SAMPLES_PER_DOC` per document unless the source
    runs short (then the same documents give more).

    Returns:
        (feedback samples, held-out samples, feedback document names, held-out document names)
    """
    order = list(documents)
    random.Random(seed).shuffle(order)
    pools: dict[str, list[list[list[int]]]] = {"held_out": [], "feedback": []}
    names: dict[str, list[str]] = {"held_out": [], "feedback": []}
    wanted = {"held_out": held_out, "feedback": feedback}
    split = "held_out"
    for name, text in order:
        if split == "held_out" and sum(min(len(c), MAX_SAMPLES_PER_DOC) for c in
                                       pools["held_out"]) >= held_out:  # fmt: skip
            split = "feedback"
        chunks = _chunks(encode(text), sample_tokens)
        if not chunks:
            continue
        pools[split].append(chunks)
        names[split].append(name)
        if split == "feedback" and sum(min(len(c), MAX_SAMPLES_PER_DOC) for c in
                                       pools["feedback"]) >= feedback:  # fmt: skip
            break
    picked: dict[str, list[list[int]]] = {}
    for key, docs in pools.items():
        samples = [c for chunks in docs for c in chunks[:MAX_SAMPLES_PER_DOC]]
        if len(samples) < wanted[key]:  # too few documents: take more from each
            samples = [c for chunks in docs for c in chunks]
        picked[key] = samples[: wanted[key]]
    return picked["feedback"], picked["held_out"], names["feedback"], names["held_out"]


# ---------------------------------------------------------------------- chat personas

#: name -> (templates, slot vocabularies): one fixed style and vocabulary per persona.
PERSONAS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "pirate": (
        [
            "Arr, {name}, ye'll be wantin' the {thing} stowed below afore {time}.",
            "Shiver me timbers, the {thing} be {state} again!",
            "Hoist the {sail} an' make fer {place}, ye scurvy {insult}!",
            "Aye, {name}, that {thing} be worth more than a chest o' {treasure}.",
            "Batten down the hatches, mateys, a {weather} be blowin' in from {place}.",
            "Yo ho, {name}! Fetch me {treasure} from the hold, an' be quick about it.",
            "Avast! No {insult} touches me {thing} while I be captain o' this ship.",
        ],
        {
            "name": [
                "Bootstrap Bill",
                "One-Eyed Jack",
                "Mary Read",
                "Calico Jim",
                "Salty Pete",
                "Anne Bonny",
                "Barnacle Ben",
                "Redbeard",
            ],
            "thing": [
                "rum",
                "cannon",
                "map",
                "spyglass",
                "anchor",
                "parrot",
                "cutlass",
                "powder keg",
                "compass",
            ],
            "time": ["dawn", "the tide turns", "the moon rises", "the next bell", "nightfall"],
            "state": [
                "soaked through",
                "gone missin'",
                "cursed",
                "rusted",
                "half sunk",
                "full o' weevils",
            ],
            "sail": ["mainsail", "jib", "topsail", "Jolly Roger", "mizzen"],
            "place": [
                "Tortuga",
                "Skull Island",
                "the Spanish Main",
                "Port Royal",
                "Davy Jones' locker",
                "the Dry Tortugas",
            ],
            "insult": ["bilge rat", "landlubber", "swab", "barnacle-brain", "sea dog"],
            "treasure": ["doubloons", "pieces o' eight", "gold", "rubies", "silver"],
            "weather": ["squall", "gale", "storm", "fog bank", "hurricane"],
        },
    ),
    "terse-sre": (
        [
            "ack. {service} p99 at {n}ms, paging {team}.",
            "rollback {service} to v{major}.{minor}. root cause tbd.",
            "{service}: {n} pods crashlooping, OOMKilled. bumping limit to {mem}Mi.",
            "lgtm. ship after the {day} freeze.",
            "disk {pct}% on {host}. rotating logs.",
            "incident {n} resolved. postmortem {day}.",
            "{host} unreachable. failing over to {region}.",
        ],
        {
            "service": [
                "api-gw",
                "auth",
                "billing",
                "search",
                "ingest",
                "checkout",
                "cdn-edge",
                "queue-worker",
            ],
            "n": [str(n) for n in (3, 7, 12, 40, 85, 120, 250, 430, 900, 1200)],
            "team": ["#oncall-core", "#payments", "#infra", "#data", "#platform"],
            "major": ["1", "2", "3", "4"],
            "minor": [str(n) for n in range(10)],
            "mem": ["512", "768", "1024", "2048", "4096"],
            "day": ["mon", "tue", "wed", "thu", "fri"],
            "pct": ["87", "91", "94", "97", "99"],
            "host": ["db-01", "db-02", "cache-3", "web-7", "etcd-2", "kafka-4"],
            "region": ["us-east-2", "eu-west-1", "ap-south-1", "us-west-2"],
        },
    ),
    "butler": (
        [
            "Very good, {title}. I shall have the {thing} brought to the {room} directly.",
            "If I may be so bold, {title}, the {guest} has waited in the {room} since {time}.",
            "I regret to inform you, {title}, that the {thing} has been {state}.",
            "Shall I lay out the {garment} for this evening, {title}?",
            "The {guest} sends {pl} compliments, {title}, and begs the pleasure of your company.",
            "Dinner will be served in the {room} at {time}, {title}.",
        ],
        {
            "title": ["sir", "madam", "my lord", "your ladyship", "Master Richard"],
            "thing": ["tea", "silver", "post", "carriage", "sherry", "morning paper", "claret"],
            "room": [
                "library",
                "drawing room",
                "conservatory",
                "east wing",
                "study",
                "morning room",
            ],
            "guest": ["vicar", "Duchess", "Colonel", "solicitor", "Lady Agatha", "Bishop"],
            "time": [
                "half past four",
                "seven o'clock",
                "a quarter to eight",
                "noon",
                "eleven o'clock",
            ],
            "state": [
                "mislaid",
                "delayed by the weather",
                "polished twice",
                "sent for",
                "returned unopened",
            ],
            "garment": [
                "dinner jacket",
                "grey morning coat",
                "tweeds",
                "evening gown",
                "velvet smoking jacket",
            ],
            "pl": ["her", "his", "their"],
        },
    ),
}


def persona_sentences(name: str, seed: int) -> Iterable[str]:
    """An endless stream of the persona's sentences, filled at random with `seed`."""
    templates, slots = PERSONAS[name]
    rng = random.Random(f"{name}/{seed}")
    while True:
        template = rng.choice(templates)
        fill = {key: rng.choice(values) for key, values in slots.items() if f"{{{key}}}" in
                template}  # fmt: skip
        yield template.format(**fill)


def persona_user(
    name: str, encode: Encode, *, feedback: int, held_out: int, sample_tokens: int
) -> User:
    """A chat-persona user: feedback from one filling seed, held-out from another."""
    user = User(name, "persona", f"templates:{name}")
    seen: set[str] = set()

    def samples(seed: int, count: int, exclude: set[str]) -> list[list[int]]:
        out: list[list[int]] = []
        text = ""
        for sentence in persona_sentences(name, seed):
            if sentence in exclude:
                continue
            seen.add(sentence)
            text += sentence + " "
            ids = encode(text.strip())
            if len(ids) >= sample_tokens:
                out.append(ids[:sample_tokens])
                text = ""
                if len(out) == count:
                    return out
        return out  # pragma: no cover - the stream is endless

    user.feedback = samples(1, feedback, set())
    feedback_sentences = set(seen)
    user.held_out = samples(2, held_out, feedback_sentences)
    user.feedback_documents = [f"fillings seed 1 ({len(feedback_sentences)} sentences)"]
    user.held_out_documents = ["fillings seed 2 (no feedback sentence)"]
    return user


# ---------------------------------------------------------------------- all users


def build_users(
    encode: Encode, *, feedback: int, held_out: int, sample_tokens: int
) -> tuple[list[User], list[str]]:
    """The real-text and persona users (sources missing here are skipped, and named).

    Returns:
        (users, notes on the sources skipped)
    """
    users: list[User] = []
    notes: list[str] = []
    for name, (kind, description, reader) in REAL_SOURCES.items():
        try:
            documents = reader()
        except (OSError, SyntaxError, ValueError) as exc:
            notes.append(f"{name}: unreadable ({exc})")
            continue
        fb, ho, fb_docs, ho_docs = split_samples(
            documents, encode, feedback=feedback, held_out=held_out, sample_tokens=sample_tokens
        )
        if len(fb) < feedback or len(ho) < held_out:
            notes.append(f"{name}: skipped, only {len(fb)} feedback / {len(ho)} held-out samples")
            continue
        users.append(User(name, kind, description, fb, ho, fb_docs, ho_docs))
    for name in PERSONAS:
        users.append(
            persona_user(
                name, encode, feedback=feedback, held_out=held_out, sample_tokens=sample_tokens
            )
        )
    return users, notes


def generic_samples(
    encode: Encode, *, per_source: int, sample_tokens: int
) -> tuple[list[list[int]], list[str]]:
    """Generic held-out samples, `per_source` from each of `GENERIC_SOURCES` (none a user's)."""
    samples: list[list[int]] = []
    used: list[str] = []
    for name, reader in GENERIC_SOURCES.items():
        try:
            documents = reader()
        except (OSError, SyntaxError, ValueError):
            continue
        _, ho, _, _ = split_samples(
            documents, encode, feedback=0, held_out=per_source, sample_tokens=sample_tokens
        )
        if ho:
            samples += ho
            used.append(f"{name} ({len(ho)})")
    return samples, used
