"""Deprecated package: figures live in :mod:`pyro_lvm.experiments.figures`.

Importing it no longer selects a matplotlib backend.
"""
