"""Alembic migrations for the job store (run automatically when a store opens).

The revisions leave out ``branch_labels`` and ``depends_on``: Alembic reads both as None when
a revision does not set them, and this history is one line without branches.
"""
