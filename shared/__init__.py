"""The vocabulary both producer and worker import: job schema, settings, storage, Celery config.

Nothing here imports torch, so the client installs light.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fluxfarm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
