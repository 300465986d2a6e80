"""Prometheus metrics of a consumer pool (optional: ``pip install pqueue-log[metrics]``).

The collector reads `pool.stats()` when scraped, so metrics cost nothing on the task path.
Each pool gets its own registry: two pools in one process never clash over metric names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool import ConsumerPool

_COUNTERS = (
    ("processed", "Tasks whose handler returned (acked)"),
    ("failed", "Attempts that raised or timed out"),
    ("retried", "Failed attempts handed back for a retry"),
    ("dead", "Tasks moved to the dead-letter queue"),
    ("timed_out", "Attempts that ran past task_timeout"),
    ("restarts", "Worker processes restarted after a crash"),
)
_GAUGES = (
    ("in_flight", "Tasks running now"),
    ("workers", "Workers taking tasks now"),
    ("lag", "Messages of the group not yet acked, in flight included"),
)


def serve(pool: ConsumerPool, port: int, host: str) -> Any:
    """Start an HTTP exporter of `pool`'s metrics on host:port; return the server (shut it down to stop).

    Raises:
        ImportError: prometheus-client is not installed.
    """
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.registry import Collector
    except ImportError as exc:
        raise ImportError("pool metrics need prometheus-client: pip install 'pqueue-log[metrics]'") from exc

    labels = ["queue", "group"]
    values = [pool.queue.path, pool.group]

    class _PoolCollector(Collector):
        def collect(self) -> Iterator[Any]:
            st = pool.stats()
            for name, doc in _COUNTERS:
                c = CounterMetricFamily(f"pqueue_pool_{name}", doc, labels=labels)
                c.add_metric(values, float(getattr(st, name)))
                yield c
            for name, doc in _GAUGES:
                g = GaugeMetricFamily(f"pqueue_pool_{name}", doc, labels=labels)
                value = getattr(st, name)
                g.add_metric(values, float("nan") if value is None else float(value))
                yield g
            b = GaugeMetricFamily("pqueue_pool_breaker_state", "1 for the breaker's current state",
                                  labels=[*labels, "state"])
            for state in ("closed", "open", "half_open"):
                b.add_metric([*values, state], 1.0 if st.breaker == state else 0.0)
            yield b
            lat = GaugeMetricFamily("pqueue_pool_handler_latency_seconds",
                                    "Handler run time over recent tasks, by quantile", labels=[*labels, "quantile"])
            for q, v in (("0.5", st.latency_p50), ("0.9", st.latency_p90), ("0.99", st.latency_p99),
                         ("1", st.latency_max)):
                lat.add_metric([*values, q], float("nan") if v is None else v)
            yield lat

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_PoolCollector())
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


__all__ = ["serve"]
