"""Synthetic data generation: generate k candidates per prompt, score them with a reward
model, filter them (a Ray Data pipeline; `jobs/sdg/config.py` says what it is asked)."""
