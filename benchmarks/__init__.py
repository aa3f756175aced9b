"""Benchmarks for mipscan against ScaNN, faiss, hnswlib and exact numpy.

Run ``python -m benchmarks.run --help`` (from the repository root) for the recall-QPS harness
and ``python -m benchmarks.bench_brute_force --help`` for the exact-search benchmark.
"""
