"""The paths a config names that must already exist for the setting to mean anything.

The schema checks what it can alone (tls_cert, ca_bundle: existing files). These are left to the tools
(`config check`, `policy check`), because the server treats them as things that may appear later
(an advisory-db checkout a cron job clones, a tokens file `token add` creates); a check that passes
while they are missing would pass silently.
"""

from __future__ import annotations

from cratemirror.config.schema import Config


def missing_paths(config: Config) -> list[str]:
    """One line per missing path: file, key, what was expected and what was found."""
    problems = []
    db = config.policy.advisory_db
    if db is not None and not db.is_dir():
        problems.append(
            f"{config.source}: policy.advisory_db: expected a RustSec advisory-db checkout (a directory "
            f"with crates/), got {str(db)!r} (no such directory)"
        )
    tokens = config.auth.tokens_file
    if config.auth.required and not tokens.is_file():
        problems.append(
            f"{config.source}: auth.tokens_file: expected a tokens file (auth.required is true; "
            f"`cratemirror token add NAME` creates it), got {str(tokens)!r} (no such file)"
        )
    return problems
