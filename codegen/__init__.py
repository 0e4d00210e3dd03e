"""Jinja templates and the renderer that turns fused regions into Triton kernels."""
