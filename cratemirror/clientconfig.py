"""The snippets that point cargo at a mirror: `.cargo/config.toml`, and the same as command-line flags.

cargo reads no environment variable for source replacement (`[source]` tables are not taken from the
environment; checked with cargo 1.95), so CI gets `--config` flags or a file written into CARGO_HOME.
"""

from __future__ import annotations


def index_url(base: str) -> str:
    # cargo requires the trailing slash on a sparse registry URL.
    return f"sparse+{base.rstrip('/')}/index/"


def cargo_config_snippet(base: str) -> str:
    return f'[source.crates-io]\nreplace-with = "mirror"\n\n[source.mirror]\nregistry = "{index_url(base)}"\n'


def cargo_config_flags(base: str) -> list[str]:
    """The snippet as `cargo --config` arguments (one per key)."""
    return [
        "--config",
        'source.crates-io.replace-with="mirror"',
        "--config",
        f'source.mirror.registry="{index_url(base)}"',
    ]


def cargo_ci_snippet(base: str) -> str:
    """Shell lines for CI: write the snippet into CARGO_HOME once, or pass it as flags per command."""
    flags = cargo_config_flags(base)
    flag_text = " ".join(f"{flags[i]} '{flags[i + 1]}'" for i in range(0, len(flags), 2))
    return (
        'mkdir -p "${CARGO_HOME:-$HOME/.cargo}"\n'
        "cat >> \"${CARGO_HOME:-$HOME/.cargo}/config.toml\" <<'EOF'\n"
        f"{cargo_config_snippet(base)}"
        "EOF\n"
        "# or per command:\n"
        f"cargo {flag_text} fetch\n"
    )
