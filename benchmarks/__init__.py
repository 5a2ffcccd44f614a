"""mep's benchmark suite: ``python -m benchmarks.suite`` from the repository root, as root (see README.md)."""
