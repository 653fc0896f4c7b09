"""Performance benchmarks of uwsfmt: ``python bench/run.py [--quick]`` (see bench/README.md)."""
