"""Benchmarks of flask-proxypool against the pools users would pick instead.

Run everything with ``bench/run`` (or ``python -m bench``); see bench/README.md.
"""
