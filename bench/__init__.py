"""Benchmarks: slow measurements that print what they measured, with the machine and settings.

They never run as timed assertions in the test suite; results go to ``bench/results/``.
"""
