"""Benchmark results: the resumable HDF5 store, tables in the paper's layout, and plots."""
from .store import ResultStore

__all__ = ["ResultStore"]
