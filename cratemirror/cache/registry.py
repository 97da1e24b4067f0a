"""One registry service per upstream (design.md): crates.io is the registry named `crates-io`, mounted
at /index/; every entry of `registries:` gets the same bundle (store, upstream client, index and crate
services, metrics labelled with its name) mounted at /registries/<name>/, in its own cache subdirectory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cratemirror.cache.crates import CrateService
from cratemirror.cache.index import IndexService
from cratemirror.cache.internal import InternalNames
from cratemirror.config.schema import CacheConfig, Config, ConfigError, RegistryConfig, UpstreamConfig
from cratemirror.fleet.coordination import Coordination, make_coordination
from cratemirror.fleet.storage import SharedStorage, make_shared_storage
from cratemirror.fleet.storage.disk import DiskTrouble, Store
from cratemirror.fleet.storage.guarded import GuardedShared
from cratemirror.metrics import Metrics
from cratemirror.names import DEFAULT_REGISTRY
from cratemirror.upstream.client import Upstream

CRATES_IO_INDEX = "https://github.com/rust-lang/crates.io-index"


log = logging.getLogger("cratemirror")


@dataclass
class Registry:
    name: str
    mount: str  # the mirror's path for this registry's index and downloads, without a trailing "/"
    upstream_url: str  # the upstream index root (what cargo's Cargo.lock records through replacement)
    cache: CacheConfig
    store: Store
    upstream: Upstream
    index: IndexService
    crates: CrateService
    metrics: Metrics
    coordination: Coordination
    shared: SharedStorage

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_REGISTRY

    def index_path(self) -> str:
        return f"{self.mount}/index/"

    def download_path(self) -> str:
        return f"{self.mount}/api/v1/crates"

    async def start(self, *, offline: bool) -> None:
        """Before serving: partial downloads of an earlier run removed, the upstream and shared storage
        clients opened."""
        removed = self.store.clean_stale_temp_files()
        if removed:
            log.info("removed %d partial downloads left by an earlier run", removed)
        if not offline:
            await self.upstream.start()
        await self.shared.start()

    async def close(self) -> None:
        await self.crates.close()
        await self.index.close()
        await self.upstream.close()
        await self.coordination.close()
        await self.shared.close()
        self.store.close()

    def record_usage(self, usage: dict[str, tuple[int, int]]) -> None:
        for kind, (size, entries) in usage.items():
            self.metrics.cache_size.labels(kind).set(size)
            self.metrics.cache_entries.labels(kind).set(entries)


def registry_cache_dir(cache_dir: Path, name: str) -> Path:
    """Where a registry's cache lives: crates.io keeps the top of cache.dir (as before extras existed)."""
    return cache_dir if name == DEFAULT_REGISTRY else cache_dir / "registries" / name


def upstream_authorization(config: Config, name: str, registry: RegistryConfig) -> str | None:
    """The registry's credential: `token`, or the variable `token_env` names (which must be set)."""
    token = registry.secret_token()
    if token is None and registry.token_env is not None:
        raise ConfigError(
            f"{config.source}: registries.{name}.token_env: expected the environment variable "
            f"{registry.token_env} to hold the token, but it is not set"
        )
    return token


def _bundle(
    name: str,
    mount: str,
    cache: CacheConfig,
    upstream_config: UpstreamConfig,
    config: Config,
    metrics: Metrics,
    disk_trouble: DiskTrouble,
    authorization: str | None,
) -> Registry:
    store = Store(cache.dir)
    upstream = Upstream(upstream_config, metrics, authorization=authorization)
    # Fleet seams, per registry: its own lock and key namespace in Redis, its own prefix in the bucket.
    coordination = make_coordination(
        config.coordination.redis_url, store, metrics, namespace=name, timeout=config.coordination.timeout
    )
    shared = make_shared_storage(
        config.storage, upstream_config.max_index_size, registry=name,
        on_integrity_failure=lambda kind: metrics.storage_integrity_failures.labels(kind).inc(),
    )  # fmt: skip
    if config.storage.backend != "local":  # a stalled bucket costs seconds: bounded calls and a breaker
        shared = GuardedShared(shared, config.storage.s3.timeout, store, metrics.storage_up.set)
    index = IndexService(
        store, upstream, metrics, cache,
        offline=config.offline, disk_trouble=disk_trouble, coordination=coordination, shared=shared,
        prefetch=upstream_config.prefetch,
    )  # fmt: skip
    crates = CrateService(
        store, index, upstream, metrics,
        offline=config.offline, max_size=cache.max_size, disk_trouble=disk_trouble,
        coordination=coordination, shared=shared,
    )  # fmt: skip
    index.prefetch.fetch_crate = crates.prefetch
    metrics.cache_max_size.labels("crate").set(cache.max_size)  # what alerts compare the size against
    return Registry(
        name, mount, upstream_config.index_url, cache, store, upstream, index, crates, metrics,
        coordination, shared,
    )  # fmt: skip


def build_registries(config: Config, metrics: Metrics, disk_trouble: DiskTrouble) -> dict[str, Registry]:
    """crates-io first, then the configured extras; each with its own cache subdirectory. cache.max_size
    applies to each registry's crates separately."""
    registries = {
        DEFAULT_REGISTRY: _bundle(
            DEFAULT_REGISTRY, "", config.cache, config.upstream, config, metrics, disk_trouble, None
        )
    }
    if config.policy.internal_names:  # private registries serve these names as before
        registries[DEFAULT_REGISTRY].index.internal = InternalNames(config.policy.internal_names)
    for name, extra in config.registries.items():
        overrides = {
            key: value
            for key in ("index_ttl", "negative_ttl", "stale_if_error")
            if (value := getattr(extra, key)) is not None
        }
        cache_dir = registry_cache_dir(config.cache.dir, name)
        cache = config.cache.model_copy(update={"dir": cache_dir, **overrides})
        upstream_config = config.upstream.model_copy(update={"index_url": extra.index_url})
        registries[name] = _bundle(
            name, f"/registries/{name}", cache, upstream_config, config,
            metrics.for_registry(name), disk_trouble, upstream_authorization(config, name, extra),
        )  # fmt: skip
    return registries
