"""What an operator sees of a worker: metrics and health (the pipeline's hooks), the HTTP endpoint, the monitor."""

from worker.observability.health import Health, Verdict
from worker.observability.metrics import REGISTRY, Metrics, Observer, observe
from worker.observability.monitor import Monitor
from worker.observability.server import Endpoint, serve

__all__ = ["REGISTRY", "Endpoint", "Health", "Metrics", "Monitor", "Observer", "Verdict", "observe", "serve"]
