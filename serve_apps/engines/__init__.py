"""Engines behind small protocols: a Serve app holds an engine and never a model directly,
so a vLLM engine can stand in for the transformers one and tests can inject a fake."""
