"""Shared pieces of actcache: the store format, errors, locations, statistics, seeding, progress."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("actcache")
except PackageNotFoundError:  # a source checkout that is not installed
    __version__ = "0.1.0"
