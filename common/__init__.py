"""Shared pieces of actcache: the store format, errors, locations, statistics, seeding, progress."""

__version__ = "0.1.0"
