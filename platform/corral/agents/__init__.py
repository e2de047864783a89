"""Agents (the `agentic_system` API) as domain code with no HTTP: the turn loop, the
tools it may run and the shields it passes messages through, each behind a small
protocol (`corral.agents.protocols`), built explicitly in the app factory."""
