"""The vocabulary both producer and worker import: job schema, settings, storage, Celery config.

Nothing here imports torch, so the client installs light.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fluxfarm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def package_version(name: str) -> str:
    """An installed package's version, or "absent": what compiled code and images' records are keyed by."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"
