"""What points cargo at a mirror: the `.cargo/config.toml` text, and a CI shell form (write the file,
or pass the same as `cargo --config` flags). `cratemirror client-config` and the status page's copy
buttons show exactly these texts.

cargo reads no environment variable for source replacement (`[source]` tables are not taken from the
environment; checked with cargo 1.95), so CI gets `--config` flags or a file written into CARGO_HOME.
"""

from __future__ import annotations

import re
import shlex

# The base URL goes into TOML strings and shell text: anything but these characters is refused, so no
# quoting context can be escaped (the Host header is validated before it gets here, too).
_BASE_RE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~\-/%]*)?")
HEREDOC_END = "CRATEMIRROR_EOF"
CARGO_HOME = "${CARGO_HOME:-$HOME/.cargo}"  # used inside double quotes


class BadBaseURL(ValueError):
    """Not a plain http(s) base URL."""


def checked_base(text: str) -> str:
    """The mirror's base URL without a trailing slash; a pasted `sparse+…/index/` is forgiven."""
    base = text.strip().removeprefix("sparse+").rstrip("/").removesuffix("/index")
    if not _BASE_RE.fullmatch(base):
        raise BadBaseURL(f"expected an http(s) URL like http://127.0.0.1:8080, got {text!r}")
    return base


def index_url(base: str) -> str:
    # cargo requires the `sparse+` prefix (without it the URL is taken for a git repository) and the
    # trailing slash.
    return f"sparse+{checked_base(base)}/index/"


def cargo_config_snippet(base: str) -> str:
    """The file: TOML only, so `cratemirror client-config > ~/.cargo/config.toml` works as is."""
    return (
        f"# cargo: use the crates.io mirror at {checked_base(base)}\n"
        "# (as ~/.cargo/config.toml, $CARGO_HOME/config.toml or <project>/.cargo/config.toml)\n"
        "[source.crates-io]\n"
        'replace-with = "mirror"\n'
        "\n"
        "[source.mirror]\n"
        f'registry = "{index_url(base)}"\n'
    )


def cargo_config_flags(base: str) -> list[str]:
    """The same as `cargo --config` arguments (one per key)."""
    return [
        "--config",
        'source.crates-io.replace-with="mirror"',
        "--config",
        f'source.mirror.registry="{index_url(base)}"',
    ]


def cargo_ci_snippet(base: str) -> str:
    """Shell for CI: (over)writes the file, so running it twice (a cached CARGO_HOME) is harmless; the
    flag form is a comment, so the whole text can be piped to `sh`."""
    toml = cargo_config_snippet(base)
    assert HEREDOC_END not in toml
    flags = " ".join(shlex.quote(arg) for arg in cargo_config_flags(base))
    return (
        f'mkdir -p "{CARGO_HOME}"\n'
        f"cat > \"{CARGO_HOME}/config.toml\" <<'{HEREDOC_END}'\n"
        f"{toml}"
        f"{HEREDOC_END}\n"
        "# or leave CARGO_HOME alone and pass the same to each cargo command:\n"
        f"# cargo {flags} build\n"
    )
