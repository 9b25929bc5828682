"""Benchmark workloads behind `promptcot bench`: each runs the same work through a reference and through the
engine in one process and reports both figures and their ratio."""
