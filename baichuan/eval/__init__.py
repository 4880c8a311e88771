"""Evaluation: benchmarks as rows of data, scored like their official scripts."""
