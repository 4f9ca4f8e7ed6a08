"""Evaluation and benchmark tooling: `cldf evaluate`, `results`, `figure`, `bench`, `demo` (and the test phantom).

Not shipped into Slicer: it needs ground truth and shared data, not a radiologist's scene.
"""
