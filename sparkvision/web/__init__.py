"""The web application, REST API and job tracker behind ``sparkvision serve``.

``create_app`` loads on first use: ``sparkvision`` reads :class:`Settings` for its ``serve`` flags
on every start, and the application pulls FastAPI, SQLAlchemy and the inference runtime.
"""

from typing import TYPE_CHECKING, Any

from sparkvision.web.security import Settings

if TYPE_CHECKING:
    from sparkvision.web.app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from sparkvision.web.app import create_app

        return create_app
    raise AttributeError(f"module 'sparkvision.web' has no attribute {name!r}")


__all__ = ["Settings", "create_app"]
