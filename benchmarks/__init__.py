"""esdmri's benchmarks, one package.

Run each from the repository root as ``python -m benchmarks.NAME``.
"""
