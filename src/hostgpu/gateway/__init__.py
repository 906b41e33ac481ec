"""The gateway: HTTP API over the job store."""

from __future__ import annotations

from hostgpu.gateway.app import create_app

__all__ = ["create_app"]
