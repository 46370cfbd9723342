"""`actcache explore`: a local web application over a run's features output with live panels backed
by the model (harvest/session.py), loaded once. See server.py for the routes, assets/ for the page."""

from .server import HOST, PORT, create_app, serve

__all__ = ["HOST", "PORT", "create_app", "serve"]
