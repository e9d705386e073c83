"""Reference models for tests, benchmarks and the demo (import the submodules directly)."""
