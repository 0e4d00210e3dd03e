"""Executes compiled graphs: the compiled module, and later the training engine and collectives."""
