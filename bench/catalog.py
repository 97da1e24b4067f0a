"""The registry the benchmark serves: a deterministic set of crates, shared by the upstream process
(which publishes it) and the driver (which builds request paths from it).

- a dependency tree for `cargo fetch`: 10 "mid" crates, each depending on 9 "leaf" crates (100 crates);
  every crate has 1-6 versions (index files of realistic size), only the newest one is padded to
  `small_size` bytes and is what cargo downloads;
- one large crate (`large_size` bytes);
- "cold" crates that nothing touches before the cold-miss workload: fresh keys for every round.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.fake_upstream import index_path

MIDS = 10
LEAVES_PER_MID = 9
INDEX_MIX = 40  # index files in the warm index-hit mix
DEP_REQ = "0.1"
_SYLLABLES = ("ka", "lo", "mi", "ze", "ru", "po", "ta", "ve", "ni", "so", "bu", "de", "fa", "gi", "ho")


@dataclass(frozen=True)
class CrateSpec:
    name: str
    versions: tuple[str, ...]  # oldest first; the newest is padded and is the one downloaded
    deps: tuple[str, ...] = ()  # crate names, each required as DEP_REQ
    pad_to: int = 0

    @property
    def newest(self) -> str:
        return self.versions[-1]

    @property
    def index_url_path(self) -> str:
        return f"/index/{index_path(self.name)}"

    @property
    def download_path(self) -> str:
        """The download route of the mirror (and of nginx configured like it)."""
        return f"/api/v1/crates/{self.name}/{self.newest}/download"

    @property
    def upstream_download_path(self) -> str:
        """Where the fake registry serves the tarball (its default `dl`)."""
        return f"/crates/{self.name}/{self.newest}/download"


@dataclass(frozen=True)
class Params:
    small_size: int = 6 * 1024
    large_size: int = 3 * 1024 * 1024
    cold_rounds: int = 3
    cold_keys: int = 10
    scale_crates: int = 0  # bench/scale.py: this many extra crates of scale_versions tiny versions each
    scale_versions: int = 5


@dataclass(frozen=True)
class Catalog:
    mids: tuple[CrateSpec, ...]
    leaves: tuple[CrateSpec, ...]
    large: CrateSpec
    cold_warmup: CrateSpec  # a cold crate used once so the mirror has read the upstream config.json
    cold: tuple[tuple[CrateSpec, ...], ...]  # [round][key]

    @property
    def tree(self) -> tuple[CrateSpec, ...]:
        return self.mids + self.leaves

    def all_crates(self) -> tuple[CrateSpec, ...]:
        return (*self.tree, self.large, self.cold_warmup, *(c for rnd in self.cold for c in rnd))

    def index_mix(self) -> list[str]:
        """The ~40 index files of the warm index-hit workload: every mid and the first leaves."""
        return [c.index_url_path for c in self.tree[:INDEX_MIX]]

    def small_crates(self) -> list[str]:
        return [c.download_path for c in self.tree]

    def root_deps(self) -> dict[str, str]:
        """The dependencies of the `cargo fetch` project."""
        return {c.name: DEP_REQ for c in self.mids}


def _word(i: int) -> str:
    """A pronounceable, unique crate-name stem, so index paths spread over many prefix directories."""
    n = len(_SYLLABLES)
    return _SYLLABLES[i % n] + _SYLLABLES[(i // n + 3 * i) % n] + _SYLLABLES[(i * 7 + 1) % n]


def _versions(i: int) -> tuple[str, ...]:
    return tuple(f"0.1.{v}" for v in range(1 + i % 6))


def build(params: Params) -> Catalog:
    leaves: list[CrateSpec] = []
    mids: list[CrateSpec] = []
    for m in range(MIDS):
        deps: list[str] = []
        for j in range(LEAVES_PER_MID):
            k = MIDS + m * LEAVES_PER_MID + j
            leaf = CrateSpec(f"{_word(k)}-leaf{k}", _versions(k), pad_to=params.small_size)
            leaves.append(leaf)
            deps.append(leaf.name)
        mids.append(CrateSpec(f"{_word(m)}-mid{m}", _versions(m), tuple(deps), params.small_size))
    large = CrateSpec("bigdata-blob", ("1.0.0",), pad_to=params.large_size)
    cold = tuple(
        tuple(
            CrateSpec(f"cold{r}-{_word(k)}{k}", ("0.1.0",), pad_to=params.small_size)
            for k in range(params.cold_keys)
        )
        for r in range(params.cold_rounds)
    )
    warmup = CrateSpec("coldwarm-up", ("0.1.0",), pad_to=params.small_size)
    return Catalog(tuple(mids), tuple(leaves), large, warmup, cold)


def scale_name(i: int) -> str:
    return f"scale{i:06d}"


def scale_version(j: int) -> str:
    return f"1.0.{j}"
