"""Built-in graph passes, one module each. `default_pipeline` lists those a strategy needs."""
