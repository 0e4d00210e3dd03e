"""Runnable examples; `examples.gpt` is the small GPT the tests and benchmarks share."""
