"""The benchmark behind `python -m tff_sam.experiments.bench` (BENCHMARKS.md)."""
