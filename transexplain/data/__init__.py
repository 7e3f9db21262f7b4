"""Data sets: the procedural "shapes" default set and readers for the real benchmark formats."""
