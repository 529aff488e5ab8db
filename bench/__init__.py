"""Benchmarks of devops-dispatch: ``python -m bench --help``. Results go to docs/benchmarks.md."""
