"""Prometheus metrics for the policies of a :class:`ResilienceRegistry`.

Read at scrape time from counters the policies keep anyway, so metrics cost the call
path nothing. Names (with ``namespace="atoll"``):

* ``atoll_breaker_state{breaker, state}``: 1 for the current state, 0 for the others
* ``atoll_breaker_calls_total{breaker, outcome}``: ``success``, ``failure``,
  ``slow_success``, ``slow_failure``, ``ignored``, ``rejected``
* ``atoll_breaker_window_calls``, ``..._window_failures``, ``..._window_slow_calls``
  ``{breaker}``: what the breaker currently decides on
* ``atoll_breaker_transitions_total{breaker}``
* ``atoll_breaker_shared_degraded{breaker}``: 1 while a shared breaker decides locally
* ``atoll_bulkhead_active``, ``atoll_bulkhead_queued``, ``atoll_bulkhead_rejected_total``
  ``{bulkhead}``
* ``atoll_rate_limiter_rejected_total``, ``atoll_rate_limiter_degraded_total``
  ``{limiter}``
* ``atoll_retry_retries_total``, ``atoll_retry_gave_up_total`` ``{retry}`` and
  ``atoll_retry_budget_exhausted_total{budget}``
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from atoll.resilience._breaker import BreakerState
from atoll.resilience._registry import ResilienceRegistry

_OUTCOMES = ("success", "failure", "slow_success", "slow_failure", "ignored", "rejected")


class ResilienceCollector(Collector):
    """A Prometheus collector reading a :class:`ResilienceRegistry` at each scrape."""

    def __init__(self, registry: ResilienceRegistry, *, namespace: str = "atoll") -> None:
        self._registry = registry
        self._ns = namespace

    def describe(self) -> Iterator[Metric]:
        return self._families(with_samples=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        yield from self._breaker_families(with_samples=with_samples)
        yield from self._other_families(with_samples=with_samples)

    def _breaker_families(self, *, with_samples: bool) -> Iterator[Metric]:
        ns = self._ns
        state = GaugeMetricFamily(
            f"{ns}_breaker_state", "1 for the breaker's current state", labels=["breaker", "state"]
        )
        calls = CounterMetricFamily(
            f"{ns}_breaker_calls",
            "Calls through the breaker by outcome",
            labels=["breaker", "outcome"],
        )
        window = {
            key: GaugeMetricFamily(f"{ns}_breaker_window_{key}", help_, labels=["breaker"])
            for key, help_ in (
                ("calls", "Calls in the window the breaker decides on"),
                ("failures", "Failed calls in the window"),
                ("slow_calls", "Slow calls in the window"),
            )
        }
        transitions = CounterMetricFamily(
            f"{ns}_breaker_transitions", "State changes of the breaker", labels=["breaker"]
        )
        degraded = GaugeMetricFamily(
            f"{ns}_breaker_shared_degraded",
            "1 while a shared breaker decides on local state because the store is unavailable",
            labels=["breaker"],
        )
        if with_samples:
            for breaker in self._registry.breakers:
                snap = breaker.snapshot()
                for candidate in BreakerState:
                    state.add_metric([snap.name, candidate.value], float(candidate is snap.state))
                counts = (
                    snap.successes_total,
                    snap.failures_total,
                    snap.slow_successes_total,
                    snap.slow_failures_total,
                    snap.ignored_total,
                    snap.rejected_total,
                )
                for outcome, value in zip(_OUTCOMES, counts, strict=True):
                    calls.add_metric([snap.name, outcome], value)
                window["calls"].add_metric([snap.name], snap.window_calls)
                window["failures"].add_metric([snap.name], snap.window_failures)
                window["slow_calls"].add_metric([snap.name], snap.window_slow)
                transitions.add_metric([snap.name], snap.transitions_total)
                if snap.sharing != "local":
                    degraded.add_metric([snap.name], float(snap.sharing == "degraded"))
        yield from (state, calls, *window.values(), transitions, degraded)

    def _other_families(self, *, with_samples: bool) -> Iterator[Metric]:
        ns = self._ns
        active = GaugeMetricFamily(
            f"{ns}_bulkhead_active", "Calls holding a slot", labels=["bulkhead"]
        )
        queued = GaugeMetricFamily(
            f"{ns}_bulkhead_queued", "Calls waiting for a slot", labels=["bulkhead"]
        )
        full = CounterMetricFamily(
            f"{ns}_bulkhead_rejected", "Calls refused by a full bulkhead", labels=["bulkhead"]
        )
        limited = CounterMetricFamily(
            f"{ns}_rate_limiter_rejected", "Calls refused for want of a permit", labels=["limiter"]
        )
        local = CounterMetricFamily(
            f"{ns}_rate_limiter_degraded",
            "Permits decided locally because the shared store was unavailable",
            labels=["limiter"],
        )
        retries = CounterMetricFamily(f"{ns}_retry_retries", "Retries made", labels=["retry"])
        gave_up = CounterMetricFamily(
            f"{ns}_retry_gave_up",
            "Calls still failing when a retry limit was reached",
            labels=["retry"],
        )
        spent = CounterMetricFamily(
            f"{ns}_retry_budget_exhausted",
            "Retries refused by a spent retry budget",
            labels=["budget"],
        )
        if with_samples:
            for bulkhead in self._registry.bulkheads:
                active.add_metric([bulkhead.name], bulkhead.active)
                queued.add_metric([bulkhead.name], bulkhead.queued)
                full.add_metric([bulkhead.name], bulkhead.rejected_total)
            for limiter in self._registry.rate_limiters:
                limited.add_metric([limiter.name], limiter.rejected_total)
                local.add_metric([limiter.name], limiter.degraded_total)
            by_name: dict[str, list[int]] = {}
            budgets = {}
            for retry in self._registry.retries:
                sums = by_name.setdefault(retry.name, [0, 0])
                sums[0] += retry.retries_total
                sums[1] += retry.gave_up_total
                if retry.budget is not None:
                    budgets[id(retry.budget)] = retry.budget
            for name, (made, stopped) in sorted(by_name.items()):
                retries.add_metric([name], made)
                gave_up.add_metric([name], stopped)
            for budget in budgets.values():
                spent.add_metric([budget.name], budget.exhausted_total)
        yield from (active, queued, full, limited, local, retries, gave_up, spent)


def install_metrics(
    registry: ResilienceRegistry, prometheus: CollectorRegistry, *, namespace: str = "atoll"
) -> ResilienceCollector:
    """Register a :class:`ResilienceCollector` for ``registry`` with ``prometheus``."""
    collector = ResilienceCollector(registry, namespace=namespace)
    prometheus.register(collector)
    return collector
