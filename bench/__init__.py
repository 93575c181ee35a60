"""Benchmarks of pixelwise against the libraries users would pick instead (``python -m bench``).

Every row times pixelwise and its reference side by side in one process, alternating the
two (A, B, A, B, ...) so that load from other processes hits both alike, and reports the
medians and their ratio. Never run as timed tests. See ``bench/RESULTS.md``.
"""
