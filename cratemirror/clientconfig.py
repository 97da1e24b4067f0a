"""The snippets that point cargo at a mirror: `.cargo/config.toml` and the equivalent environment."""

from __future__ import annotations


def index_url(base: str) -> str:
    # cargo requires the trailing slash on a sparse registry URL.
    return f"sparse+{base.rstrip('/')}/index/"


def cargo_config_snippet(base: str) -> str:
    return f'[source.crates-io]\nreplace-with = "mirror"\n\n[source.mirror]\nregistry = "{index_url(base)}"\n'


def cargo_env_snippet(base: str) -> str:
    return f"CARGO_SOURCE_CRATES_IO_REPLACE_WITH=mirror\nCARGO_SOURCE_MIRROR_REGISTRY={index_url(base)}\n"
