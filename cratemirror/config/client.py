"""What points cargo at a mirror: the `.cargo/config.toml` text, and a CI shell form (write the file,
or pass the same as `cargo --config` flags). `cratemirror client-config` and the status page's copy
buttons show exactly these texts.

cargo reads no environment variable for source replacement (`[source]` tables are not taken from the
environment; checked with cargo 1.95), so CI gets `--config` flags or a file written into CARGO_HOME.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from cratemirror.config.schema import Config
from cratemirror.redact import redact, split_userinfo

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


@dataclass(frozen=True, slots=True)
class ClientSetup:
    """What beyond crates.io's replacement the client needs: tokens (auth.required) and, per extra
    registry, its name and the URL clients know it by (its index_url, credentials stripped)."""

    auth_required: bool = False
    registries: tuple[tuple[str, str], ...] = ()


def client_setup(config: Config) -> ClientSetup:
    """The setup a loaded config implies. A registry URL that could escape quoting raises BadBaseURL."""
    registries = []
    for name, registry in config.registries.items():
        if name == "mirror" or (
            name.endswith("-mirror") and name.removesuffix("-mirror") in config.registries
        ):
            # The client config names crates.io's replacement "mirror" and each registry's "<name>-mirror".
            raise BadBaseURL(
                f"registries.{name}: this name clashes with a name client-config gives; rename it"
            )
        url, _ = split_userinfo(registry.index_url)
        if not _BASE_RE.fullmatch(url.rstrip("/")):
            raise BadBaseURL(f"registries.{name}.index_url cannot be printed safely: {redact(url)!r}")
        registries.append((name, url.rstrip("/") + "/"))
    return ClientSetup(config.auth.required, tuple(registries))


def token_variable(registry: str) -> str:
    """The environment variable cargo reads a registry's token from (`-` becomes `_`)."""
    return f"CARGO_REGISTRIES_{registry.upper().replace('-', '_')}_TOKEN"


def _tables(base: str, setup: ClientSetup) -> list[tuple[str, list[tuple[str, str]]]]:
    """(table, [(key, value)]) in print order. With auth, the replacement targets are [registries.*]
    entries with a credential provider (cargo sends a token only for those); source replacement of each
    extra registry keeps its own URL in Cargo.lock."""
    mirror = checked_base(base)

    def target(name: str, url: str) -> tuple[str, list[tuple[str, str]]]:
        if setup.auth_required:
            return f"registries.{name}", [("index", url), ("credential-provider", "cargo:token")]
        return f"source.{name}", [("registry", url)]

    tables = [("source.crates-io", [("replace-with", "mirror")]), target("mirror", index_url(mirror))]
    for name, upstream in setup.registries:
        tables += [
            (f"registries.{name}", [("index", f"sparse+{upstream}")]),
            (f"source.{name}", [("registry", f"sparse+{upstream}"), ("replace-with", f"{name}-mirror")]),
            target(f"{name}-mirror", f"sparse+{mirror}/registries/{name}/index/"),
        ]
    return tables


def cargo_tables(base: str, setup: ClientSetup = ClientSetup()) -> list[tuple[str, list[tuple[str, str]]]]:
    """The tables and keys the client config sets (for `client-config --merge`)."""
    return _tables(base, setup)


def token_names(setup: ClientSetup) -> list[str]:
    """The registries cargo asks a token for (all get the same mirror token), when auth is required."""
    if not setup.auth_required:
        return []
    return ["mirror", *(f"{name}-mirror" for name, _ in setup.registries)]


def cargo_config_snippet(base: str, setup: ClientSetup = ClientSetup()) -> str:
    """The file: TOML only, so `cratemirror client-config > ~/.cargo/config.toml` works as is."""
    lines = [
        f"# cargo: use the crates.io mirror at {checked_base(base)}",
        "# (as ~/.cargo/config.toml, $CARGO_HOME/config.toml or <project>/.cargo/config.toml)",
    ]
    if setup.auth_required:
        lines.append("# The mirror wants a token (`cratemirror token add NAME`); cargo reads it from:")
        lines += [f"#   {token_variable(name)}=<token>" for name in token_names(setup)]
    for position, (table, entries) in enumerate(_tables(base, setup)):
        lines += [""] if position else []
        lines.append(f"[{table}]")
        lines += [f'{key} = "{value}"' for key, value in entries]
    return "\n".join(lines) + "\n"


def cargo_config_flags(base: str, setup: ClientSetup = ClientSetup()) -> list[str]:
    """The same as `cargo --config` arguments (one per key)."""
    flags = []
    for table, entries in _tables(base, setup):
        for key, value in entries:
            flags += ["--config", f'{table}.{key}="{value}"']
    return flags


def cargo_ci_snippet(base: str, setup: ClientSetup = ClientSetup()) -> str:
    """Shell for CI: (over)writes the file, so running it twice (a cached CARGO_HOME) is harmless; the
    flag form is a comment, so the whole text can be piped to `sh`."""
    toml = cargo_config_snippet(base, setup)
    assert HEREDOC_END not in toml
    flags = " ".join(shlex.quote(arg) for arg in cargo_config_flags(base, setup))
    return (
        f'mkdir -p "{CARGO_HOME}"\n'
        f"cat > \"{CARGO_HOME}/config.toml\" <<'{HEREDOC_END}'\n"
        f"{toml}"
        f"{HEREDOC_END}\n"
        "# or leave CARGO_HOME alone and pass the same to each cargo command:\n"
        f"# cargo {flags} build\n"
        + "".join(
            f"# the job's environment needs {token_variable(name)}=<token>\n" for name in token_names(setup)
        )
    )
