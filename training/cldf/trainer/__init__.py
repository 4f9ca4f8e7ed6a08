"""Training tooling: every stage of `cldf train`, the choice of settings on validation, checkpoints.

Shipped into Slicer with the runtime, for the module's Train section (`python -m cldf train`).
"""
