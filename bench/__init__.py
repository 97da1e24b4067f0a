"""Benchmarks of cratemirror against nginx proxy_cache and against the upstream directly (not tests:
run `python -m bench`; see bench/README.md)."""
