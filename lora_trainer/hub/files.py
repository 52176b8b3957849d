"""Which files of a repository a use needs: never the whole repository when a few files serve.

A ``RepoFiles`` turns a repository's file list into the ordered list to download, or says what is missing.
The same plan runs on the Hub's listing (what to fetch) and on a cached snapshot's files (is it complete?).
The order makes the second question safe: files are downloaded in plan order, and every plan ends with a
file whose presence implies the rest (a folder's index, a model's weights), so a run cut half-way leaves a
snapshot whose plan still fails, never one that looks complete. Each file itself appears in the cache only
once fully downloaded (huggingface_hub writes to a temporary ``.incomplete`` name and renames).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Collection, List, Optional, Protocol, Sequence, Tuple


class MissingRepoFiles(Exception):
    """The repository (or cached snapshot) lacks files a plan requires; ``missing`` names them."""

    def __init__(self, missing: Sequence[str]) -> None:
        super().__init__(", ".join(missing))
        self.missing = list(missing)


class RepoFiles(Protocol):
    """What one use needs from a repository."""

    @property
    def label(self) -> str:
        """What the files are, for messages ("BLIP captioner", "SD base model")."""

    def plan(self, names: Collection[str], cached: Collection[str] = ()) -> List[str]:
        """The files to have, in download order; raises MissingRepoFiles. ``names`` are repository paths
        (forward slashes); ``cached`` are those already in the cache, preferred among alternatives."""

    def describe(self) -> str:
        """The files in words, for messages (``config.json, model.safetensors (or pytorch_model.bin)``)."""

    def include_patterns(self) -> List[str]:
        """Patterns for ``hf download REPO --include ...`` that fetch these files."""


def describe_alternatives(alternatives: Sequence[str]) -> str:
    """``a (or b) (or c)``."""
    return alternatives[0] + "".join(f" (or {name})" for name in alternatives[1:])


def pick(alternatives: Sequence[str], names: Collection[str], cached: Collection[str] = ()) -> Optional[str]:
    """The first alternative already cached, else the first the repository has, else None."""
    return next((a for a in alternatives if a in cached), None) or next((a for a in alternatives if a in names), None)


def weight_files(names: Collection[str], folder: str, candidates: Sequence[Tuple[str, str]]) -> Optional[List[str]]:
    """The files holding one model's weights in ``folder`` ("" for the repository root): the first of
    ``candidates`` ((stem, extension), best first) present as one file, or as an index with its shards
    (``stem-00001-of-00002.ext``, shards first, the index last). None when there are none."""
    prefix = f"{folder}/" if folder else ""
    for stem, extension in candidates:
        single = f"{prefix}{stem}{extension}"
        if single in names:
            return [single]
        index = f"{single}.index.json"
        if index in names:
            shard = re.compile(re.escape(prefix + stem) + r"-\d+-of-\d+" + re.escape(extension))
            shards = sorted(name for name in names if shard.fullmatch(name))
            if shards:
                return [*shards, index]
    return None


@dataclass(frozen=True)
class ListedFiles:
    """Named files: each ``required`` entry lists alternatives (one must be present), ``optional`` glob
    patterns are fetched when the repository has them. List the largest required entry (the weights) last:
    the plan puts optional files first and required ones after, in the order given."""

    label: str
    required: Tuple[Tuple[str, ...], ...]
    optional: Tuple[str, ...] = ()

    def plan(self, names: Collection[str], cached: Collection[str] = ()) -> List[str]:
        chosen, missing = [], []
        for alternatives in self.required:
            name = pick(alternatives, names, cached)
            if name is None:
                missing.append(describe_alternatives(alternatives))
            else:
                chosen.append(name)
        if missing:
            raise MissingRepoFiles(missing)
        extra = sorted(n for n in names if n not in chosen and any(fnmatch.fnmatch(n, p) for p in self.optional))
        return [*extra, *chosen]

    def describe(self) -> str:
        return ", ".join(describe_alternatives(alternatives) for alternatives in self.required)

    def include_patterns(self) -> List[str]:
        patterns = [alternatives[0] for alternatives in self.required]
        return patterns + [p for p in self.optional if p not in patterns]
