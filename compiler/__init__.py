"""Capture, strategy, pass manager, cost model and `compile()`."""
