"""The web application, REST API and job tracker behind ``sparkvision serve``."""

from .app import create_app
from .security import Settings

__all__ = ["Settings", "create_app"]
