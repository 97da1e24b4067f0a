"""Supply-chain policy at the door: RustSec advisories, licences and deny/allow lists.

The policy is a view: the bytes in storage stay the upstream's; the index is served with blocked
versions marked yanked (with `enforce`) and a download of a blocked version is refused with 403.
Modules: semver (cargo and rustsec version rules), advisories (the advisory-db reader), licenses (SPDX
and the crate's Cargo.toml), rules (config -> verdicts), view (index rewriting), service (one worker's
runtime state), http (the 403), check (`cratemirror policy check`), bundle (carrying the db in bundles).
"""
