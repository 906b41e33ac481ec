"""Alembic migrations for the job store (run automatically when a store opens)."""
