"""What points rustup at a mirror: two environment variables (rustup reads no config file for them).

`cratemirror client-config --rustup` and the status page's copy button show exactly these texts.
The base URL is checked by config/client.py's `checked_base`, so it cannot escape the shell quoting.
"""

from __future__ import annotations

from cratemirror.config.client import checked_base


def rustup_variables(base: str) -> list[tuple[str, str]]:
    mirror = checked_base(base)
    return [
        ("RUSTUP_DIST_SERVER", f"{mirror}/toolchains"),
        ("RUSTUP_UPDATE_ROOT", f"{mirror}/toolchains/rustup"),
    ]


def rustup_env_snippet(base: str) -> str:
    """`export` lines: `eval "$(cratemirror client-config --rustup --url URL)"`, or a profile file."""
    lines = [f"# rustup: toolchains through the mirror at {checked_base(base)}"]
    lines += [f'export {name}="{value}"' for name, value in rustup_variables(base)]
    return "\n".join(lines) + "\n"


def rustup_ci_snippet(base: str) -> str:
    """Shell for a CI step: the variables for this step, and for later steps where the CI keeps an
    environment file (GitHub Actions' $GITHUB_ENV); then rustup-init or rustup work unchanged."""
    variables = rustup_variables(base)
    lines = [f'export {name}="{value}"' for name, value in variables]
    lines.append('if [ -n "${GITHUB_ENV:-}" ]; then')
    lines += [f'  echo "{name}={value}" >> "$GITHUB_ENV"' for name, value in variables]
    lines.append("fi")
    lines.append(
        '# no rustup yet? curl -sSf "$RUSTUP_UPDATE_ROOT/dist/x86_64-unknown-linux-gnu/rustup-init" '
        "-o rustup-init && chmod +x rustup-init && ./rustup-init -y --no-modify-path"
    )
    return "\n".join(lines) + "\n"
