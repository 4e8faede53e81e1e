"""Benchmarks against peers (bench.py, recipe.py); not part of the gpt package."""
