"""Benchmarks of mmprm-infer's engines: ``python -m bench.run --help`` (see bench/README.md)."""
