"""Benchmark runners (perturbation, segmentation, ERASER) and their metrics as pure functions."""
