"""Prometheus metrics: what a rollout looks like from Grafana, and what pages on-call.

Two kinds of metrics, one :class:`prometheus_client.CollectorRegistry` (injected,
never the global one):

* **Pulled at scrape time** (a custom collector): nodes per stage, each node's
  current stage and when it entered it, the rollout's progress, the admission
  window, power actions, and the boot servers' counters (DHCP, TFTP, HTTP). The
  objects they come from (:class:`~orchestrator.tracker.Tracker`,
  :class:`~orchestrator.scheduler.Scheduler`, the boot server's
  :class:`~orchestrator.bootserver.serve.BootServers`, the wake driver) already count
  everything; the collector only reads them, so nothing is counted twice and
  nothing can drift. The collector never raises: each section is read from a
  snapshot (``list(...)``) and a section that fails anyway is skipped for that
  scrape and counted in ``bootorch_metrics_collect_errors_total``.
* **Pushed on every stage change** (:meth:`Metrics.observe_transitions`, hooked
  into the scheduler's ``on_change``): the stage-duration histogram by ``stage``
  (never per node) and failures by reason category.

The endpoint (:func:`serve_metrics`) is a small h11 server running as a trio
task, so a scrape reads the tracker's dicts between two trio steps, never while
they change (prometheus_client's ``start_http_server`` would read them from
another thread).

Names follow the Prometheus conventions: prefix ``bootorch_``, base units
(seconds, bytes), ``_total`` for counters, ``_timestamp_seconds`` for Unix times.
Stage names are the product's (``pending`` .. ``ready``, ``failed``).

======================================================  =======  ==========================================
metric                                                  type     labels
======================================================  =======  ==========================================
``bootorch_nodes``                                      gauge    ``stage`` (every stage, 0 included)
``bootorch_nodes_reached``                              gauge    ``stage``: nodes that got this far (funnel)
``bootorch_node_stage``                                 gauge    ``node, mac, stage``: 1, one series per node
``bootorch_node_stage_entered_timestamp_seconds``       gauge    ``node, mac, stage``
``bootorch_node_boot_attempts``                         gauge    ``node, mac``
``bootorch_stage_timeout_seconds``                      gauge    ``stage``
``bootorch_stage_duration_seconds``                     histo    ``stage`` (time spent in it, on leaving)
``bootorch_node_failures_total``                        counter  ``reason, stage``
``bootorch_rollout_nodes``                              gauge    ``result``: ready, failed, unfinished
``bootorch_rollout_failure_budget_nodes``               gauge
``bootorch_rollout_aborted``                            gauge
``bootorch_admission_window``                           gauge
``bootorch_admission_window_max``                       gauge
``bootorch_nodes_in_flight``                            gauge
``bootorch_server_admission_window``                    gauge    ``server``: each boot server's window (``servers:``; ``main``)
``bootorch_server_nodes_in_flight``                     gauge    ``server``
``bootorch_power_actions_total``                        counter  ``driver, action, result``
``bootorch_wol_packets_sent_total``                     counter
``bootorch_dhcp_packets_total``                         counter  ``direction, type``
``bootorch_dhcp_events_total``                          counter  ``event`` (malformed, dropped_*, ...)
``bootorch_dhcp_send_errors_total``                     counter
``bootorch_dhcp_shed_total``                            counter  ``reason`` (discover_stale, discover_overflow, request_overflow)
``bootorch_file_sent_bytes_total``                      counter  ``protocol`` (tftp, http)
``bootorch_file_transfers_active``                      gauge    ``protocol``
``bootorch_file_transfers_total``                       counter  ``protocol, result`` (ok, failed)
``bootorch_file_transfers_queued``                      gauge
``bootorch_file_transfer_slots``                        gauge
``bootorch_tftp_packets_total``                         counter  ``direction``
``bootorch_tftp_retransmits_total``                     counter
``bootorch_tftp_malformed_packets_total``               counter
``bootorch_tftp_refused_requests_total``                counter
``bootorch_tftp_wrong_tid_packets_total``               counter
``bootorch_tftp_duplicate_requests_total``              counter
``bootorch_tftp_waited_requests_total``                 counter
``bootorch_tftp_wait_expired_total``                    counter
``bootorch_tftp_requests_waiting``                      gauge
``bootorch_http_responses_total``                       counter  ``code``
``bootorch_http_connections_open``                      gauge
``bootorch_http_connections_total``                     counter
``bootorch_http_protocol_errors_total``                 counter
``bootorch_http_timeouts_total``                        counter
``bootorch_http_evictions_total``                       counter
``bootorch_http_cap_waits_total``                       counter
``bootorch_http_internal_errors_total``                 counter
``bootorch_events_dropped_total``                       counter  ``source`` (tftp, http, dhcp)
``bootorch_metrics_collect_errors_total``               counter
======================================================  =======  ==========================================

Wiring (``rollout`` and ``serve``)::

    metrics = Metrics()
    metrics.attach(tracker=tracker, scheduler=sched, running=running, wake=wake)
    Scheduler(..., on_change=lambda ts: (progress.transitions(ts), metrics.observe_transitions(ts)))
    host, port = split_listen(plan.metrics.listen)
    await nursery.start(serve_metrics, metrics, host, port)
"""

from __future__ import annotations

import gzip
import logging
from functools import partial
from typing import Any, Iterable, Mapping

import h11
import prometheus_client
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from orchestrator.tracker import ORDERED, Stage, Transition

__all__ = ["Metrics", "serve_metrics", "split_listen", "failure_category", "STAGE_DURATION_BUCKETS"]

log = logging.getLogger(__name__)

#: Stage durations run from a fraction of a second (a pxelinux config) to many
#: minutes (a kernel download in a boot storm, an OS coming up).
STAGE_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)

#: Stages a node can *leave* in the normal course of a boot (histogram series are pre-created for them).
_TIMED_STAGES = [s for s in ORDERED if s not in (Stage.PENDING, Stage.READY)]


def failure_category(reason: str) -> str:
    """A bounded label for a failure's free-text reason (the scheduler's wording)."""
    r = reason.lower()
    if r.startswith("stuck in"):
        return "timeout"
    if r.startswith("readiness failed"):
        return "readiness"
    if r.startswith("was ready before the restart"):
        return "reverify"
    return "other"


def _driver_name(driver: Any) -> str:
    if driver is None:
        return "none"
    name = getattr(driver, "name", None)
    return str(name) if isinstance(name, str) and name else type(driver).__name__.lower()


class Metrics:
    """The registry, the push-based metrics and what the collector reads.

    ``attach`` may be called any number of times, e.g. once the boot server has
    started and again once the scheduler exists; ``None`` leaves a source as it is.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Counters and histograms would also emit *_created series: noise for dashboards.
        prometheus_client.disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.tracker: Any = None
        self.scheduler: Any = None
        self.running: Any = None
        self.wake: Any = None
        self.timeouts: Mapping[Stage, float] | None = None
        self.collect_errors = 0
        self._entered: dict[str, tuple[Stage, float]] = {}
        self.stage_duration = Histogram(
            "bootorch_stage_duration_seconds",
            "Time nodes spent in a stage, observed when they leave it (re-sent wakes do not restart it).",
            ["stage"], buckets=STAGE_DURATION_BUCKETS, registry=self.registry)
        self.failures = Counter(
            "bootorch_node_failures",
            "Nodes given up on, by reason category (timeout, readiness, reverify, other) and the stage they failed in.",
            ["reason", "stage"], registry=self.registry)
        for s in _TIMED_STAGES:
            self.stage_duration.labels(stage=s.value)  # series exist (at zero) before the first boot
        self._collector = _Collector(self)
        self.registry.register(self._collector)

    def attach(self, tracker: Any = None, scheduler: Any = None, running: Any = None, wake: Any = None,
               timeouts: Mapping[Stage, float] | None = None) -> Metrics:
        """Name the live objects the collector reads at scrape time."""
        if tracker is not None:
            self.tracker = tracker
        if scheduler is not None:
            self.scheduler = scheduler
            if self.tracker is None:
                self.tracker = getattr(scheduler, "tracker", None)
            if wake is None and self.wake is None:
                self.wake = getattr(scheduler, "wake_driver", None)
        if running is not None:
            self.running = running
        if wake is not None:
            self.wake = wake
        if timeouts is not None:
            self.timeouts = dict(timeouts)
        return self

    # ------------------------------------------------------------------ push

    def observe_transitions(self, ts: Iterable[Transition]) -> None:
        """Feed stage changes (the scheduler's ``on_change``): durations and failures. Never raises."""
        for t in ts:
            try:
                self._observe(t)
            except Exception:  # a metrics bug must never break a rollout
                self.collect_errors += 1
                log.exception("metrics: observing %r failed", t)

    def _observe(self, t: Transition) -> None:
        if t.to_stage == Stage.FAILED:
            self.failures.labels(reason=failure_category(t.evidence), stage=t.from_stage.value).inc()
        if t.from_stage == t.to_stage:
            return  # the stage's timer restarted (a re-sent wake): the stage goes on
        entered = self._entered_at(t)
        if entered is not None and t.from_stage != Stage.PENDING and t.time >= entered:
            self.stage_duration.labels(stage=t.from_stage.value).observe(t.time - entered)
        self._entered[t.mac] = (t.to_stage, t.time)

    def _entered_at(self, t: Transition) -> float | None:
        seen = self._entered.get(t.mac)
        if seen is not None and seen[0] == t.from_stage:
            return seen[1]
        # Not seen by us (restored from the journal after a restart): the tracker's history knows.
        st = self.tracker.nodes.get(t.mac) if self.tracker is not None else None
        if st is None:
            return None
        hist = list(st.history)
        end = next((i for i in range(len(hist) - 1, -1, -1) if hist[i] is t), len(hist))
        for h in reversed(hist[:end]):
            if h.to_stage == t.from_stage and h.from_stage != h.to_stage:
                return h.time
            if h.to_stage != t.from_stage:
                return None
        return None

    # ------------------------------------------------------------------ scrape

    def exposition(self) -> bytes:
        """The text exposition of the registry (what ``/metrics`` returns)."""
        return generate_latest(self.registry)

    def names(self) -> set[str]:
        """Every sample name the registry can emit, suffixes included (for tests and docs)."""
        out: set[str] = set()
        families = [*self.stage_duration.describe(), *self.failures.describe(), *self._collector.describe(), *self.registry.collect()]
        for fam in families:
            base = fam.name
            if fam.type == "counter":
                out.add(base + "_total")
            elif fam.type == "histogram":
                out.update({base + "_bucket", base + "_sum", base + "_count"})
            elif fam.type == "summary":
                out.update({base, base + "_sum", base + "_count"})
            else:
                out.add(base)
            out.update(s.name for s in fam.samples)
        return out


class _Collector:
    """Reads the tracker, scheduler, servers and wake driver at scrape time."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def describe(self) -> list[Metric]:
        # The families without samples: enough for the registry's duplicate-name check.
        return [f for f in self._families(describe=True)]

    def collect(self) -> list[Metric]:
        return self._families(describe=False)

    def _families(self, *, describe: bool) -> list[Metric]:
        out: list[Metric] = []
        for section in (self._nodes, self._rollout, self._power, self._dhcp, self._files, self._tftp, self._http):
            try:
                out.extend(section(describe))
            except Exception:
                self.m.collect_errors += 1
                log.exception("metrics: collecting %s failed", section.__name__)
        out.append(CounterMetricFamily("bootorch_metrics_collect_errors",
                                       "Metric sections skipped at a scrape (or transitions not observed) because reading them failed.",
                                       value=self.m.collect_errors))
        return out

    # -- tracker ---------------------------------------------------------------------

    def _nodes(self, describe: bool) -> list[Metric]:
        nodes = GaugeMetricFamily("bootorch_nodes", "Nodes currently in each stage.", labels=["stage"])
        reached = GaugeMetricFamily("bootorch_nodes_reached",
                                    "Nodes whose furthest stage (in any attempt, failure aside) is this one or a later one: the stage funnel.",
                                    labels=["stage"])
        node_stage = GaugeMetricFamily("bootorch_node_stage", "The stage each node is in (always 1; one series per node).",
                                       labels=["node", "mac", "stage"])
        entered = GaugeMetricFamily("bootorch_node_stage_entered_timestamp_seconds",
                                    "Unix time each node entered its current stage (time in stage: time() minus this).",
                                    labels=["node", "mac", "stage"])
        attempts = GaugeMetricFamily("bootorch_node_boot_attempts",
                                     "Boot attempts of each node so far (a wake, power cycle or reboot starts one).",
                                     labels=["node", "mac"])
        timeouts = GaugeMetricFamily("bootorch_stage_timeout_seconds",
                                     "Seconds a node may spend in a stage before it is stuck (the plan's rollout.timeouts).",
                                     labels=["stage"])
        fams = [nodes, reached, node_stage, entered, attempts, timeouts]
        tracker = self.m.tracker
        if describe:
            return fams
        if tracker is None:
            if self.m.timeouts:
                self._timeouts(timeouts, self.m.timeouts)
                return [timeouts]
            return []
        states = list(tracker.nodes.values())
        counts = {s: 0 for s in Stage}
        furthest = [0] * (len(ORDERED))
        for st in states:
            stage = st.stage
            counts[stage] += 1
            node, mac = str(st.node), str(st.mac)
            node_stage.add_metric([node, mac, stage.value], 1)
            if stage != Stage.PENDING or st.since:  # a node never woken entered nothing
                entered.add_metric([node, mac, stage.value], float(st.since))
            attempts.add_metric([node, mac], st.attempt)
            top = max((h.to_stage.index for h in list(st.history) if h.to_stage != Stage.FAILED), default=0)
            if stage != Stage.FAILED:
                top = max(top, stage.index)
            furthest[min(top, len(ORDERED) - 1)] += 1
        for s in Stage:
            nodes.add_metric([s.value], counts[s])
        at_or_past = 0
        for i in range(len(ORDERED) - 1, -1, -1):
            at_or_past += furthest[i]
            reached.add_metric([ORDERED[i].value], at_or_past)
        limits = self.m.timeouts if self.m.timeouts is not None else getattr(tracker, "timeouts", None)
        if limits:
            self._timeouts(timeouts, limits)
        return fams

    @staticmethod
    def _timeouts(fam: GaugeMetricFamily, limits: Mapping[Any, float]) -> None:
        for stage, seconds in list(limits.items()):
            fam.add_metric([Stage(stage).value], float(seconds))

    # -- scheduler ---------------------------------------------------------------------

    def _rollout(self, describe: bool) -> list[Metric]:
        result = GaugeMetricFamily("bootorch_rollout_nodes", "Rollout nodes by result: ready, failed, or unfinished.",
                                   labels=["result"])
        budget = GaugeMetricFamily("bootorch_rollout_failure_budget_nodes",
                                   "Failed nodes the rollout tolerates (the plan's failure_budget); one more aborts it.")
        aborted = GaugeMetricFamily("bootorch_rollout_aborted", "1 once the rollout stopped waking nodes because failures exceeded the budget.")
        window = GaugeMetricFamily("bootorch_admission_window", "Admission window: nodes allowed in flight (woken, not yet past initrd) at once.")
        window_max = GaugeMetricFamily("bootorch_admission_window_max", "The admission window's ceiling (the plan's admission.max_downloading).")
        in_flight = GaugeMetricFamily("bootorch_nodes_in_flight", "Nodes in flight: woken and not yet past initrd.")
        server_window = GaugeMetricFamily("bootorch_server_admission_window",
                                          "Admission window of each boot server (the plan's servers:, and main: its own).",
                                          labels=["server"])
        server_flight = GaugeMetricFamily("bootorch_server_nodes_in_flight",
                                          "Nodes in flight whose downloads each boot server carries.", labels=["server"])
        fams = [result, budget, aborted, window, window_max, in_flight, server_window, server_flight]
        sched, tracker = self.m.scheduler, self.m.tracker
        if describe:
            return fams
        if sched is not None:
            tally = {"ready": 0, "failed": 0, "unfinished": 0}
            for run in list(sched.jobs.values()):
                tally[run.result if run.result in ("ready", "failed") else "unfinished"] += 1
            for k, v in tally.items():
                result.add_metric([k], v)
            budget.add_metric([], sched.budget)
            aborted.add_metric([], 1 if sched.aborted else 0)
            window.add_metric([], sched.window)
            window_max.add_metric([], sched.max_window)
            in_flight.add_metric([], sched.in_flight())
            for name, w in list(sched.windows.items()):
                server_window.add_metric([name], w.size)
                server_flight.add_metric([name], sched.in_flight_on(name))
            return fams
        if tracker is not None:  # `serve`: no scheduler, the tracker's view
            tally = {"ready": 0, "failed": 0, "unfinished": 0}
            for st in list(tracker.nodes.values()):
                tally[st.stage.value if st.stage in (Stage.READY, Stage.FAILED) else "unfinished"] += 1
            for k, v in tally.items():
                result.add_metric([k], v)
            return [result]
        return []

    def _power(self, describe: bool) -> list[Metric]:
        actions = CounterMetricFamily("bootorch_power_actions", "Power actions taken (wake, power_cycle) by driver and result (ok, failed).",
                                      labels=["driver", "action", "result"])
        wol = CounterMetricFamily("bootorch_wol_packets_sent", "Wake-on-LAN magic packets sent (repeats included).")
        fams: list[Metric] = [actions, wol]
        if describe:
            return fams
        sched = self.m.scheduler
        if sched is not None:
            drivers = {"wake": _driver_name(sched.wake_driver), "power_cycle": _driver_name(sched.bmc)}
            tally: dict[tuple[str, str, str], int] = {}
            for run in list(sched.jobs.values()):
                for a in list(run.actions):
                    action = str(a.get("action", "unknown"))
                    key = (drivers.get(action, _driver_name(sched.bmc)), action, "ok" if a.get("ok") else "failed")
                    tally[key] = tally.get(key, 0) + 1
            for driver in sorted(set(drivers.values())):  # zero series: a dashboard shows 0, not "no data"
                for action, d in drivers.items():
                    if d == driver:
                        for res in ("ok", "failed"):
                            tally.setdefault((driver, action, res), 0)
            for key, n in sorted(tally.items()):
                actions.add_metric(list(key), n)
        else:
            fams.remove(actions)
        sent = getattr(self.m.wake, "sent", None)
        if isinstance(sent, int):
            wol.add_metric([], sent)
        else:
            fams.remove(wol)
        return fams

    # -- boot servers ------------------------------------------------------------------

    def _dhcp(self, describe: bool) -> list[Metric]:
        packets = CounterMetricFamily("bootorch_dhcp_packets", "DHCP messages received (in) and sent (out), by message type.",
                                      labels=["direction", "type"])
        events = CounterMetricFamily("bootorch_dhcp_events", "DHCP server conditions other than messages: malformed, dropped_*, "
                                     "unknown_client, lease_conflict, pool_exhausted, netboot_gated, ...", labels=["event"])
        send_errors = CounterMetricFamily("bootorch_dhcp_send_errors", "DHCP replies the socket refused to send.")
        shed = CounterMetricFamily("bootorch_dhcp_shed", "DHCP datagrams dropped unanswered under overload, by reason: "
                                   "discover_stale (waited past its client's retry), discover_overflow, request_overflow "
                                   "(backlog queue full).", labels=["reason"])
        fams: list[Metric] = [packets, events, send_errors, shed]
        if describe:
            return fams
        run = self.m.running
        core = getattr(run, "dhcp_core", None) if run is not None else None
        if core is None:
            return []
        counters = dict(core.counters)
        for mtype in ("discover", "request"):  # the types a PXE boot always has, at zero before the first one
            counters.setdefault("in_" + mtype, 0)
        for mtype in ("offer", "ack"):
            counters.setdefault("out_" + mtype, 0)
        for key, n in sorted(counters.items()):
            if key == "packets_in":
                continue  # the sum of the others
            direction, _, mtype = key.partition("_")
            if direction in ("in", "out") and mtype:
                packets.add_metric([direction, mtype], n)
            else:
                events.add_metric([key], n)
        stats = getattr(run, "dhcp_stats", None)
        if stats is not None:
            send_errors.add_metric([], stats.send_errors)
            shed_counts = getattr(stats, "shed", None)
            if shed_counts is not None:
                for reason in ("discover_stale", "discover_overflow", "request_overflow"):  # at zero before the first
                    shed.add_metric([reason], shed_counts.get(reason, 0))
            else:
                fams.remove(shed)
        else:
            fams.remove(send_errors)
            fams.remove(shed)
        return fams

    def _files(self, describe: bool) -> list[Metric]:
        sent = CounterMetricFamily("bootorch_file_sent_bytes", "Boot file payload bytes sent (TFTP: acknowledged by the client).",
                                   labels=["protocol"])
        active = GaugeMetricFamily("bootorch_file_transfers_active", "File transfers in progress (TFTP: including those queued for a slot).",
                                   labels=["protocol"])
        transfers = CounterMetricFamily("bootorch_file_transfers", "Finished file transfers by result (ok, failed, and for TFTP unconfirmed: every block sent, final ACK lost; options_declined: the client ended it with ERROR 8 after our OACK, a UEFI size probe; superseded: its client sent another request from the same port; HTTP: 2xx/3xx responses are ok).",
                                        labels=["protocol", "result"])
        dropped = CounterMetricFamily("bootorch_events_dropped", "Boot events a server dropped because the tracker's channel was full.",
                                      labels=["source"])
        queued = GaugeMetricFamily("bootorch_file_transfers_queued", "File transfers waiting for a transfer slot (admission).")
        slots = GaugeMetricFamily("bootorch_file_transfer_slots", "Transfer slots of the boot server (bootserver.max_transfers).")
        fams: list[Metric] = [sent, active, transfers, dropped, queued, slots]
        if describe:
            return fams
        run = self.m.running
        if run is None:
            return []
        t, h = run.tftp_counters, run.http_stats
        sent.add_metric(["tftp"], t.bytes_sent)
        sent.add_metric(["http"], h.bytes_sent)
        active.add_metric(["tftp"], t.active)
        active.add_metric(["http"], h.active)
        transfers.add_metric(["tftp", "ok"], t.transfers_ok)
        transfers.add_metric(["tftp", "failed"], t.transfers_failed)
        transfers.add_metric(["tftp", "unconfirmed"], getattr(t, "transfers_unconfirmed", 0))
        transfers.add_metric(["tftp", "options_declined"], getattr(t, "options_declined", 0))
        transfers.add_metric(["tftp", "superseded"], getattr(t, "superseded", 0))
        by_status = dict(h.by_status)
        transfers.add_metric(["http", "ok"], sum(n for code, n in by_status.items() if int(code) < 400))
        transfers.add_metric(["http", "failed"], sum(n for code, n in by_status.items() if int(code) >= 400))
        dropped.add_metric(["tftp"], t.events_dropped)
        dropped.add_metric(["http"], h.events_dropped)
        if getattr(run, "dhcp_stats", None) is not None:
            dropped.add_metric(["dhcp"], run.dhcp_stats.events_dropped)
        adm = getattr(run, "admission", None)
        if adm is None:
            return [sent, active, transfers, dropped]
        try:
            load = adm.load(trio.current_time())
            queued.add_metric([], load.queued)
        except RuntimeError:  # outside trio (a test calling generate_latest directly): no clock
            fams.remove(queued)
        if adm.max_active is not None:
            slots.add_metric([], adm.max_active)
        else:
            fams.remove(slots)
        return fams

    def _tftp(self, describe: bool) -> list[Metric]:
        fams: list[Metric] = [
            CounterMetricFamily("bootorch_tftp_packets", "TFTP packets received (in) and sent (out), retransmits included.", labels=["direction"]),
            CounterMetricFamily("bootorch_tftp_retransmits", "TFTP packets sent again after the client's ACK did not come in time."),
            CounterMetricFamily("bootorch_tftp_malformed_packets", "TFTP packets that did not parse."),
            CounterMetricFamily("bootorch_tftp_refused_requests", "TFTP requests dropped unanswered: the waiting queue or the address's cap was full (the client retries)."),
            CounterMetricFamily("bootorch_tftp_wrong_tid_packets", "TFTP packets from an unexpected port (RFC 1350 TID), answered with ERROR 5."),
            CounterMetricFamily("bootorch_tftp_duplicate_requests", "Repeated TFTP requests for a transfer already running or waiting (ignored)."),
            CounterMetricFamily("bootorch_tftp_waited_requests", "TFTP requests that waited for a transfer slot (all were taken)."),
            CounterMetricFamily("bootorch_tftp_wait_expired", "TFTP requests dropped while waiting for a slot: after max_stall, or when their client stopped re-sending them for 15 s."),
            GaugeMetricFamily("bootorch_tftp_requests_waiting", "TFTP requests waiting for a transfer slot now."),
        ]
        if describe:
            return fams
        run = self.m.running
        if run is None:
            return []
        t = run.tftp_counters
        fams[0].add_metric(["in"], t.packets_in)
        fams[0].add_metric(["out"], t.packets_out)
        values = (t.retransmits, t.malformed, t.refused, t.wrong_tid, t.duplicate_requests,
                  getattr(t, "waited", 0), getattr(t, "wait_expired", 0), getattr(t, "waiting", 0))
        for fam, value in zip(fams[1:], values, strict=True):
            fam.add_metric([], value)
        return fams

    def _http(self, describe: bool) -> list[Metric]:
        responses = CounterMetricFamily("bootorch_http_responses", "HTTP responses by status code.", labels=["code"])
        open_ = GaugeMetricFamily("bootorch_http_connections_open", "HTTP connections open now.")
        simple = [
            ("bootorch_http_connections", "HTTP connections accepted.", "connections_total"),
            ("bootorch_http_protocol_errors", "HTTP requests that were not valid HTTP/1.x.", "protocol_errors"),
            ("bootorch_http_timeouts", "HTTP connections closed for idleness or a stalled request or send.", "timeouts"),
            ("bootorch_http_evictions", "Idle HTTP connections closed to make room at the connection cap.", "evictions"),
            ("bootorch_http_internal_errors", "Unexpected errors in an HTTP connection handler (bugs).", "internal_errors"),
            ("bootorch_http_too_slow", "HTTP transfers ended for running below min_rate while others waited for a slot.", "too_slow"),
            ("bootorch_http_client_waits", "HTTP requests that waited because their address ran max_per_client transfers.", "client_waits"),
            ("bootorch_http_refused_connections", "HTTP connections closed at once: their address held its connection cap.", "refused"),
            ("bootorch_http_cap_waits", "HTTP connections accepted at the connection cap that waited for a slot.", "cap_waits"),
        ]
        counters = [CounterMetricFamily(name, doc) for name, doc, _ in simple]
        fams: list[Metric] = [responses, open_, *counters]
        if describe:
            return fams
        run = self.m.running
        if run is None:
            return []
        h = run.http_stats
        for code, n in sorted(dict(h.by_status).items()):
            responses.add_metric([str(code)], n)
        open_.add_metric([], h.connections)
        for fam, (_, _, attr) in zip(counters, simple, strict=True):
            fam.add_metric([], getattr(h, attr))
        return fams


# --------------------------------------------------------------------------- the endpoint


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9810"`` -> ``("127.0.0.1", 9810)``; ``"[::1]:9810"`` works too."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


_INDEX = b'<html><head><title>bootorch</title></head><body><a href="/metrics">/metrics</a></body></html>\n'
_MAX_REQUEST_HEAD = 16 * 1024


def _respond(metrics: Metrics, req: h11.Request) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    if req.method not in (b"GET", b"HEAD"):
        return 405, [(b"content-type", b"text/plain; charset=utf-8"), (b"allow", b"GET, HEAD")], b"method not allowed\n"
    path = req.target.split(b"?", 1)[0]
    if path == b"/metrics":
        body = metrics.exposition()
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]
        accept = b",".join(v for k, v in req.headers if k == b"accept-encoding")
        if b"gzip" in accept:
            body = gzip.compress(body, compresslevel=1)
            headers.append((b"content-encoding", b"gzip"))
        return 200, headers, body
    if path == b"/":
        return 200, [(b"content-type", b"text/html; charset=utf-8")], _INDEX
    return 404, [(b"content-type", b"text/plain; charset=utf-8")], b"not found: try /metrics\n"


async def _next_request(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Request | None:
    """The next request with its (ignored) body read, or None when the client went away."""
    req: h11.Request | None = None
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)  # b"" = EOF: h11 turns it into ConnectionClosed or an error
            continue
        if isinstance(ev, h11.Request):
            req = ev
        elif isinstance(ev, h11.EndOfMessage):
            return req
        elif isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
            return None


async def _send(conn: h11.Connection, stream: trio.abc.Stream, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


class _Server:
    def __init__(self, metrics: Metrics, *, max_connections: int, idle_timeout: float, send_timeout: float) -> None:
        self.metrics = metrics
        self.max_connections, self.idle_timeout, self.send_timeout = max_connections, idle_timeout, send_timeout
        self.connections = 0
        #: Connections ended by an unexpected error (contained; see the log).
        self.errors = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_HEAD)
        self.connections += 1
        try:
            if self.connections > self.max_connections:
                with trio.move_on_after(self.send_timeout):
                    await self._reply(conn, stream, None, 503, [(b"content-type", b"text/plain")], b"too many connections\n", close=True)
                return
            while True:  # one request per turn; bounded by the idle timeout between requests
                req = None
                with trio.move_on_after(self.idle_timeout):
                    req = await _next_request(conn, stream)
                if req is None:
                    return
                status, headers, body = _respond(self.metrics, req)
                with trio.move_on_after(self.send_timeout) as cs:
                    await self._reply(conn, stream, req, status, headers, body)
                if cs.cancelled_caught or conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as e:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with trio.move_on_after(self.send_timeout):
                    code = e.error_status_hint
                    await self._reply(conn, stream, None, code, [(b"content-type", b"text/plain")], b"bad request\n", close=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass
        except Exception:  # this connection's error boundary: a scraper never ends the orchestrator
            self.errors += 1
            log.exception("metrics: a connection failed")
        finally:
            self.connections -= 1
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await stream.aclose()

    @staticmethod
    async def _reply(conn: h11.Connection, stream: trio.abc.Stream, req: h11.Request | None, status: int,
                     headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool = False) -> None:
        headers = [*headers, (b"content-length", str(len(body)).encode()), (b"server", b"bootorch")]
        if close:
            headers.append((b"connection", b"close"))
        await _send(conn, stream, h11.Response(status_code=status, headers=headers))
        if body and (req is None or req.method != b"HEAD"):
            await _send(conn, stream, h11.Data(data=body))
        await _send(conn, stream, h11.EndOfMessage())


async def serve_metrics(metrics: Metrics, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED,
                        max_connections: int = 32, idle_timeout: float = 120.0, send_timeout: float = 10.0) -> None:
    """Serve ``/metrics`` on ``host:port`` until cancelled, as a trio task (no threads).

    ``port=0`` binds a free port; ``task_status.started((host, bound_port))``
    reports it. Each scrape renders the registry in the trio thread, between two
    steps of the rollout, so the collector sees consistent state.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and len(listeners) > 1:  # each family got its own free port: keep the first
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    server = _Server(metrics, max_connections=max_connections, idle_timeout=idle_timeout, send_timeout=send_timeout)
    try:
        bound = listeners[0].socket.getsockname()
        async with trio.open_nursery() as nursery:
            task_status.started((bound[0], bound[1]))
            await trio.serve_listeners(partial(_Server.handle, server), listeners, handler_nursery=nursery)
    finally:
        for listener in listeners:
            with trio.move_on_after(0) as cs:
                cs.shield = True
                await listener.aclose()
