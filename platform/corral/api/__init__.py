"""Pydantic models of every schema in the Llama Stack draft spec (v0.0.1), one module per
API area; class names are the spec's schema names."""
