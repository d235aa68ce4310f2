"""Jobs built on the public API (each usable from Python and from the CLI)."""
