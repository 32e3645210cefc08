"""The web application, REST API and job tracker behind ``sparkvision serve``."""

from sparkvision.web.app import create_app
from sparkvision.web.security import Settings

__all__ = ["Settings", "create_app"]
