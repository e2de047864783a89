"""Corral: fine-tune and serve Llama models on Ray, behind the Llama Stack API."""

__version__ = "0.1.0"
