"""Prometheus exposition of the hub's plain counters, read at scrape time.

Nothing on the hot path touches prometheus_client: a custom collector turns
the hub's integers into metric families only when /metrics is requested.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ._hubdefs import BATCH_BUCKETS, PUBLISH_BUCKETS, BrokerStats
from .watchdog import LoopMonitor

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["CONTENT_TYPE", "MetricsExporter"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _HubCollector:
    def __init__(self, hub: Hub, monitor: LoopMonitor,
                 broker_stats: Callable[[], BrokerStats] | None = None) -> None:
        self.hub = hub
        self.monitor = monitor
        self.broker_stats = broker_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.hub.stats()
        yield CounterMetricFamily(
            "fastrelay_events_accepted", "Datagrams accepted and relayed.", value=stats.accepted)
        yield CounterMetricFamily(
            "fastrelay_events_relayed", "Event deliveries (events x clients).", value=stats.relayed)
        yield _counters("fastrelay_events_rejected", "Datagrams dropped, by reason.", "reason",
                        stats.rejects)
        yield GaugeMetricFamily(
            "fastrelay_clients_connected", "WebSocket clients receiving events.",
            value=stats.clients)
        yield _counters("fastrelay_clients_closed", "Clients gone, by reason.", "reason",
                        stats.closed)
        yield GaugeMetricFamily(
            "fastrelay_client_bytes_owed", "Bytes queued for clients, in the relay and its transports.",
            value=stats.owed_bytes)
        yield GaugeMetricFamily(
            "fastrelay_machines", "Machines in the registry.", value=stats.machines)
        yield CounterMetricFamily(
            "fastrelay_machines_evicted", "Machines forgotten because the registry was full.",
            value=stats.evicted)
        yield CounterMetricFamily(
            "fastrelay_frames_sent",
            "WebSocket frames built for clients: an event once per filter it goes to, shared by "
            "that filter's clients; snapshots and replays once per client.",
            value=stats.frames_sent)
        yield CounterMetricFamily(
            "fastrelay_bytes_sent", "Bytes written to clients.", value=stats.bytes_sent)
        yield _histogram("fastrelay_batch_size", "Datagrams per drained batch.", BATCH_BUCKETS,
                         stats.batch_histogram, stats.accepted)
        stream = GaugeMetricFamily(
            "fastrelay_stream_seq", "Seq of the newest accepted event, in the labelled epoch.",
            labels=["epoch"])
        stream.add_metric([stats.epoch], stats.seq)
        yield stream
        yield GaugeMetricFamily(
            "fastrelay_history_events", "Events the history holds for resuming clients.",
            value=stats.history_events)
        yield GaugeMetricFamily(
            "fastrelay_history_bytes", "Bytes of frames the history holds.",
            value=stats.history_bytes)
        yield GaugeMetricFamily(
            "fastrelay_history_oldest_seq", "Seq of the oldest event in the history (0: empty).",
            value=stats.history_oldest_seq or 0)
        yield _counters("fastrelay_resumes", "Requests to resume, by outcome.", "outcome",
                        stats.resumes)
        yield CounterMetricFamily(
            "fastrelay_events_replayed", "Events sent from the history to resuming clients.",
            value=stats.replayed)
        yield GaugeMetricFamily(
            "fastrelay_filters", "Distinct filters clients subscribe with.", value=stats.filters)
        yield GaugeMetricFamily(
            "fastrelay_filtered_clients", "Clients subscribed with a filter.",
            value=stats.filtered_clients)
        yield GaugeMetricFamily(
            "fastrelay_loop_lag_seconds", "How late the last loop-monitor tick ran.",
            value=self.monitor.last_lag)
        if self.broker_stats is not None:
            yield from _broker_metrics(self.broker_stats())


def _broker_metrics(broker: BrokerStats) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "fastrelay_broker_up", "1 while Redis answers both the publisher and the reader.",
        value=1 if broker.up else 0)
    yield GaugeMetricFamily(
        "fastrelay_broker_outbox_events", "Accepted events waiting to be published.",
        value=broker.outbox_events)
    yield GaugeMetricFamily(
        "fastrelay_broker_outbox_bytes", "Bytes of the events waiting to be published.",
        value=broker.outbox_bytes)
    yield CounterMetricFamily(
        "fastrelay_broker_events_published", "Events this relay published to the stream.",
        value=broker.published)
    yield CounterMetricFamily(
        "fastrelay_broker_events_received", "Stream entries this relay relayed.",
        value=broker.received)
    yield CounterMetricFamily(
        "fastrelay_broker_reconnects", "Times Redis came back after being unreachable.",
        value=broker.reconnects)
    yield CounterMetricFamily(
        "fastrelay_broker_resyncs", "Times the relay took up the stream anew.",
        value=broker.resyncs)
    yield _histogram("fastrelay_broker_publish_seconds",
                     "Round trips of publishing one batch to Redis.", PUBLISH_BUCKETS,
                     broker.publish_histogram, broker.publish_seconds)


def _counters(name: str, documentation: str, label: str,
              counts: Mapping[str, int]) -> CounterMetricFamily:
    """One counter family with a sample per ``label`` value."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, n in counts.items():
        family.add_metric([value], n)
    return family


def _histogram(name: str, documentation: str, bounds: tuple[float, ...],
               counts: tuple[int, ...], sum_value: float) -> HistogramMetricFamily:
    """A histogram family from per-bucket counts (one more than ``bounds``: +Inf)."""
    buckets = []
    running = 0
    for bound, n in zip(bounds, counts, strict=False):
        running += n
        buckets.append((str(bound), running))
    buckets.append(("+Inf", running + counts[-1]))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum_value)


class MetricsExporter:
    """Renders /metrics for one hub."""

    def __init__(self, hub: Hub, monitor: LoopMonitor,
                 broker_stats: Callable[[], BrokerStats] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_HubCollector(hub, monitor, broker_stats))

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
