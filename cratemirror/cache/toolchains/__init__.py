"""rustup toolchains through the mirror: path parsing, manifest verification and the service."""
