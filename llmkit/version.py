"""The installed llmkit's version, as packaging recorded it, for what the kit writes down about itself."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmkit")
except PackageNotFoundError:  # imported from a source tree that pip has not installed
    __version__ = "0+unknown"
