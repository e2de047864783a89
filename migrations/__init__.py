"""Alembic environment for Corral's SQL store (installed as `corral.migrations`)."""
