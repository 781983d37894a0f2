"""The farm's Celery app for Celery's own tools, built from the `FLUXFARM_*` settings:

    celery -A fluxfarm.celery inspect ping
    celery -A fluxfarm.celery inspect active_queues
    celery -A fluxfarm.celery flower --port=5555

The farm sends and consumes with Redis transport options of its own (priority lists `Q:3`, `Q:6`, the
lease as visibility timeout), and a Celery client built from the broker URL alone names its reply
queues by kombu's defaults: its broadcasts reach the workers but every reply is lost (`No nodes replied`,
Flower's empty workers page). This app is the one the workers run, so every tool that takes `-A` agrees
with them. Workers answer only with FLUXFARM_REMOTE_CONTROL=true (the compose file turns it on for Flower).
"""

from __future__ import annotations

from fluxfarm.shared.celery_app import make_celery_app
from fluxfarm.shared.settings import FarmSettings

app = make_celery_app(FarmSettings())
