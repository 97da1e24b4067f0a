"""cratemirror: a pull-through caching mirror for crates.io."""

__version__ = "0.1.0"
PROJECT_URL = "https://github.com/cratemirror/cratemirror"
