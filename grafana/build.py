"""Build ikos's Grafana dashboards: ``python grafana/build.py`` writes ``dashboards/*.json``.

The dashboards are code, built with Grafana's own ``grafana-foundation-sdk``
(a build dependency only, in the ``dev`` extra: ikos never imports it), so
that a panel is a few lines that say what it shows rather than a page of
hand-written JSON whose typos Grafana would accept silently. The JSON files
are committed, to drop into a Grafana as they are, and
``tests/test_grafana.py`` checks they equal what this script writes: edit
this file, never the JSON. The same test evaluates every PromQL expression
below against a real Prometheus scraping a running ikosd.

Every query is filtered by the ``job`` and ``instance`` variables (several
ikosd instances in one Prometheus) and goes to the data source chosen in
the ``datasource`` variable, so that the dashboards work whatever the data
source is called. ``python grafana/build.py --check`` exits 1 when the
committed files differ from what it would write.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from grafana_foundation_sdk.builders import (
    bargauge,
    dashboard,
    prometheus,
    stat,
    statetimeline,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders import (
    common as common_builders,
)
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prom_model

P = TypeVar("P")

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: The instance filter every query carries.
SEL = 'job=~"$job", instance=~"$instance"'
#: ... and one daemon's.
ONE = SEL + ', daemon="$daemon"'


def query(expr: str, legend: str = "__auto", *, instant: bool = False) -> prometheus.Dataquery:
    """A Prometheus target: ``expr`` with its legend, a range query unless ``instant``."""
    q = prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)
    if instant:
        q = q.instant().format(prom_model.PromQueryFormat.TABLE)
    return q


def _panel(panel: P, title: str, description: str, targets: Sequence[Any], w: int, h: int) -> P:
    """``panel`` with what every panel has: title, description, data source, size, targets.

    The panel builders share these methods without a common base class.
    """
    p: Any = panel
    p = p.title(title).description(description).datasource(DATASOURCE).span(w).height(h)
    for i, t in enumerate(targets):
        p = p.with_target(t.ref_id(chr(ord("A") + i)))
    return cast(P, p)


def graph(
    title: str, description: str, *targets: Any, unit: str = "short", w: int = 12, h: int = 8
) -> timeseries.Panel:
    """A time series panel."""
    # the legend a table with last and max: daemons' names are long, their peaks matter
    legend = (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["lastNotNull", "max"])
    )
    p = _panel(timeseries.Panel(), title, description, targets, w, h)
    return p.unit(unit).fill_opacity(10).legend(legend)


def single(
    title: str,
    description: str,
    *targets: Any,
    unit: str = "short",
    w: int = 4,
    h: int = 4,
    thresholds: Sequence[tuple[float | None, str]] = ((None, "green"),),
) -> stat.Panel:
    """A stat panel: one big number per series, coloured by ``thresholds``."""
    steps = [model.Threshold(value=v, color=c) for v, c in thresholds]
    p = _panel(stat.Panel(), title, description, targets, w, h)
    return (
        p.unit(unit)
        .thresholds(dashboard.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps))
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
    )


def bars(
    title: str, description: str, *targets: Any, unit: str = "short", w: int = 12, h: int = 8
) -> bargauge.Panel:
    """A bar gauge: one bar per series, their last values."""
    p = _panel(bargauge.Panel(), title, description, targets, w, h)
    return p.unit(unit).min(0).orientation(common.VizOrientation.HORIZONTAL)


def listing(title: str, description: str, *targets: Any, w: int = 24, h: int = 8) -> table.Panel:
    """A table of the series' labels and current values (instant queries)."""
    return _panel(table.Panel(), title, description, targets, w, h)


def timeline(
    title: str, description: str, *targets: Any, w: int = 24, h: int = 6
) -> statetimeline.Panel:
    """A state timeline: which series was 1 when."""
    p = _panel(statetimeline.Panel(), title, description, targets, w, h)
    return p.show_value(common.VisibilityMode.NEVER).merge_values(True)


def row(title: str) -> dashboard.Row:
    """A row: the panels after it, up to the next row, under ``title``."""
    return dashboard.Row(title)


def variables(*, with_daemon: bool = False) -> list[Builder[Any]]:
    """The dashboards' variables: data source, job, instance (and daemon)."""
    out: list[Builder[Any]] = [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        dashboard.QueryVariable("job")
        .label("Job")
        .datasource(DATASOURCE)
        .query("label_values(ikos_manager_uptime_seconds, job)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .sort(model.VariableSort.ALPHABETICAL_ASC),
        dashboard.QueryVariable("instance")
        .label("ikosd")
        .description("the ikosd instances: their metrics addresses")
        .datasource(DATASOURCE)
        .query('label_values(ikos_manager_uptime_seconds{job=~"$job"}, instance)')
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .sort(model.VariableSort.ALPHABETICAL_ASC),
    ]
    if with_daemon:
        out.append(
            dashboard.QueryVariable("daemon")
            .label("Daemon")
            .datasource(DATASOURCE)
            .query(f"label_values(ikos_daemon_up{{{SEL}}}, daemon)")
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_ASC)
        )
    return out


def board(uid: str, title: str, description: str, *, with_daemon: bool = False) -> Any:
    """A dashboard with what the three share: tags, time, variables, links to the others.

    The ``uid`` is fixed so that links and provisioning find the same
    dashboard across rebuilds and Grafanas.
    """
    b = (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["ikos"])
        .editable()
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .link(
            dashboard.DashboardLink("ikos dashboards")
            .type(model.DashboardLinkType.DASHBOARDS)
            .tags(["ikos"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    for v in variables(with_daemon=with_daemon):
        b = b.with_variable(v)
    return b


def tree() -> Any:
    """The tree at a glance: states, restarts, alerts, supervisors, ikosd itself."""
    b = board(
        "ikos-tree",
        "ikos: tree",
        "Every daemon of the supervision tree at a glance: states, restarts, alerts, "
        "supervisors' restart intensity and ikosd's own process.",
    )
    b = (
        b.with_row(row("Daemons"))
        .with_panel(
            single(
                "Running",
                "Daemons running now (ikos_daemon_up).",
                query(f"sum(ikos_daemon_up{{{SEL}}})"),
            )
        )
        .with_panel(
            single(
                "Not running",
                "Daemons that are not running: stopped, starting, backing off or failed.",
                query(f"sum(1 - ikos_daemon_up{{{SEL}}})"),
                thresholds=((None, "green"), (1, "orange")),
            )
        )
        .with_panel(
            single(
                "Failed",
                "Daemons in the failed state.",
                query(f'sum(ikos_daemon_state{{{SEL}, state="failed"}})'),
                thresholds=((None, "green"), (1, "red")),
            )
        )
        .with_panel(
            single(
                "Restarts (1h)",
                "Restarts of all daemons over the last hour.",
                query(f"sum(increase(ikos_daemon_restarts_total{{{SEL}}}[1h]))"),
                thresholds=((None, "green"), (1, "orange"), (10, "red")),
            )
        )
        .with_panel(
            single(
                "Alerts active",
                "Alerts ikosd holds active now (its own thresholds, [alerts] in ikos.toml).",
                query(f"sum(ikos_alerts_active{{{SEL}}})"),
                thresholds=((None, "green"), (1, "red")),
            )
        )
        .with_panel(
            single(
                "Scrape",
                "1 when Prometheus scraped ikosd's /metrics successfully.",
                query(f"up{{{SEL}}}", "{{instance}}"),
                thresholds=((None, "red"), (1, "green")),
            )
        )
        .with_panel(
            bars(
                "Daemons by state",
                "How many daemons are in each state.",
                query(f"sum by (state) (ikos_daemon_state{{{SEL}}})", "{{state}}"),
            )
        )
        .with_panel(
            graph(
                "Restarts",
                "Restarts per second of each daemon that restarted.",
                query(
                    f"sum by (daemon) (rate(ikos_daemon_restarts_total{{{SEL}}}[$__rate_interval]))"
                    " > 0",
                    "{{daemon}}",
                ),
                unit="ops",
            )
        )
        .with_panel(
            listing(
                "Daemons",
                "Each daemon's current state, kind and supervisor.",
                query(
                    f"ikos_daemon_state{{{SEL}}} == 1",
                    instant=True,
                ),
            )
        )
        .with_row(row("Alerts"))
        .with_panel(
            listing(
                "Alerts firing",
                "The alerts active now (ikos_alert_firing): kind, daemon, severity.",
                query(f"ikos_alert_firing{{{SEL}}}", instant=True),
                w=12,
            )
        )
        .with_panel(
            graph(
                "Alerts fired",
                "Alerts that fired, by kind, and notifications held back by the rate limit.",
                query(
                    f"sum by (alert) "
                    f"(increase(ikos_alerts_fired_total{{{SEL}}}[$__rate_interval]))",
                    "{{alert}}",
                ),
                query(
                    f"sum(increase(ikos_alerts_suppressed_total{{{SEL}}}[$__rate_interval]))",
                    "suppressed",
                ),
            )
        )
        .with_row(row("Supervisors"))
        .with_panel(
            graph(
                "Supervisor restarts",
                "Restarts each supervisor performed, per second.",
                query(
                    f"sum by (supervisor) "
                    f"(rate(ikos_supervisor_restarts_total{{{SEL}}}[$__rate_interval]))",
                    "{{supervisor}}",
                ),
                unit="ops",
            )
        )
        .with_panel(
            bars(
                "Restart intensity left",
                "Restarts each supervisor still allows in its current window before it gives "
                "up (and fails to its parent).",
                query(
                    f"min by (supervisor) (ikos_supervisor_intensity_left{{{SEL}}})",
                    "{{supervisor}}",
                ),
            ).thresholds(
                dashboard.ThresholdsConfig()
                .mode(model.ThresholdsMode.ABSOLUTE)
                .steps(
                    [
                        model.Threshold(value=None, color="red"),
                        model.Threshold(value=1, color="orange"),
                        model.Threshold(value=2, color="green"),
                    ]
                )
            )
        )
        .with_row(row("ikosd"))
        .with_panel(
            single(
                "Uptime",
                "Time since ikosd started.",
                query(f"max(ikos_manager_uptime_seconds{{{SEL}}})", "{{instance}}"),
                unit="s",
            )
        )
        .with_panel(
            single(
                "Pending state writes",
                "State-store writes queued and not yet on disk.",
                query(f"sum(ikos_state_pending_writes{{{SEL}}})"),
                thresholds=((None, "green"), (100, "orange")),
            )
        )
        .with_panel(
            single(
                "State write failures (1h)",
                "Writes of the state store that failed over the last hour.",
                query(f"sum(increase(ikos_state_write_failures_total{{{SEL}}}[1h]))"),
                thresholds=((None, "green"), (1, "red")),
            )
        )
        .with_panel(
            single(
                "Fork server restarts",
                "Restarts of the fork server that spawns actors.",
                query(f"sum(ikos_fork_server_restarts_total{{{SEL}}})"),
                thresholds=((None, "green"), (1, "orange")),
            )
        )
        .with_panel(
            single(
                "Orphans reaped",
                "Processes re-parented to ikosd and reaped by it.",
                query(f"sum(ikos_orphans_reaped_total{{{SEL}}})"),
            )
        )
        .with_panel(
            single(
                "Open fds",
                "File descriptors ikosd holds open.",
                query(f"sum(ikos_manager_process_open_fds{{{SEL}}})"),
            )
        )
        .with_panel(
            graph(
                "ikosd CPU",
                "CPU time of ikosd's own process, in cores.",
                query(
                    f"rate(ikos_manager_process_cpu_seconds_total{{{SEL}}}[$__rate_interval])",
                    "{{instance}}",
                ),
                unit="percentunit",
            )
        )
        .with_panel(
            graph(
                "ikosd memory",
                "Resident memory of ikosd's own process.",
                query(f"ikos_manager_process_resident_memory_bytes{{{SEL}}}", "{{instance}}"),
                unit="bytes",
            )
        )
    )
    return b


def daemon() -> Any:
    """One daemon in depth, chosen with the ``daemon`` variable."""
    b = board(
        "ikos-daemon",
        "ikos: daemon",
        "One daemon in depth: its state, resources, restarts, mailbox, asks and health checks.",
        with_daemon=True,
    )
    return (
        b.with_row(row("$daemon"))
        .with_panel(
            single(
                "Up",
                "1 when the daemon runs.",
                query(f"max(ikos_daemon_up{{{ONE}}})"),
                thresholds=((None, "red"), (1, "green")),
            )
        )
        .with_panel(
            single(
                "Restarts",
                "Restarts since ikosd started.",
                query(f"max(ikos_daemon_restarts_total{{{ONE}}})"),
                thresholds=((None, "green"), (1, "orange")),
            )
        )
        .with_panel(
            single(
                "Uptime",
                "Time since the daemon's current process started.",
                query(f"time() - max(ikos_daemon_start_time_seconds{{{ONE}}})"),
                unit="s",
            )
        )
        .with_panel(
            single(
                "Processes",
                "Processes of the daemon: its main process and the ones it started.",
                query(f"max(ikos_daemon_processes{{{ONE}}})"),
            )
        )
        .with_panel(
            single(
                "Threads",
                "Threads of the daemon's processes.",
                query(f"max(ikos_daemon_threads{{{ONE}}})"),
            )
        )
        .with_panel(
            single(
                "Open fds",
                "File descriptors the daemon's processes hold open.",
                query(f"max(ikos_daemon_open_fds{{{ONE}}})"),
            )
        )
        .with_panel(
            timeline(
                "State",
                "The daemon's state over time.",
                query(f"ikos_daemon_state{{{ONE}}} == 1", "{{state}}"),
            )
        )
        .with_row(row("Resources"))
        .with_panel(
            graph(
                "CPU",
                "CPU time of the daemon's processes, in cores.",
                query(
                    f"rate(ikos_daemon_cpu_seconds_total{{{ONE}}}[$__rate_interval])",
                    "{{instance}}",
                ),
                unit="percentunit",
                w=8,
            )
        )
        .with_panel(
            graph(
                "Memory",
                "Resident (rss) and unique (uss) memory of the daemon's processes.",
                query(f"ikos_daemon_memory_bytes{{{ONE}}}", "{{kind}}"),
                unit="bytes",
                w=8,
            )
        )
        .with_panel(
            graph(
                "File descriptors and threads",
                "Open file descriptors and threads of the daemon's processes.",
                query(f"ikos_daemon_open_fds{{{ONE}}}", "fds"),
                query(f"ikos_daemon_threads{{{ONE}}}", "threads"),
                w=8,
            )
        )
        .with_panel(
            graph(
                "Restarts and transitions",
                "Restarts of the daemon and its state transitions, per second.",
                query(
                    f"sum(rate(ikos_daemon_restarts_total{{{ONE}}}[$__rate_interval]))",
                    "restarts",
                ),
                query(
                    f"sum by (state) "
                    f"(rate(ikos_state_transitions_total{{{ONE}}}[$__rate_interval]))",
                    "to {{state}}",
                ),
                unit="ops",
                w=24,
            )
        )
        .with_row(row("Actor: mailbox and asks"))
        .with_panel(
            graph(
                "Mailbox depth",
                "Messages waiting in the actor's mailbox.",
                query(f"ikos_actor_mailbox_depth{{{ONE}}}", "depth"),
                w=8,
            )
        )
        .with_panel(
            graph(
                "Messages",
                "Messages the actor handled per second (tells and asks), and dead letters: "
                "messages sent to it while it was not there.",
                query(
                    f"sum(rate(ikos_actor_messages_total{{{ONE}}}[$__rate_interval]))", "handled"
                ),
                query(
                    f"sum(rate(ikos_actor_ask_duration_seconds_count{{{ONE}}}[$__rate_interval]))",
                    "asks",
                ),
                query(
                    f"sum(rate(ikos_dead_letters_total{{{ONE}}}[$__rate_interval]))",
                    "dead letters",
                ),
                unit="ops",
                w=8,
            )
        )
        .with_panel(
            graph(
                "Ask latency",
                "Time from an ask's receipt by the actor to its reply: quantiles.",
                *(
                    query(
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate(ikos_actor_ask_duration_seconds_bucket{{{ONE}}}"
                        f"[$__rate_interval])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.9, 0.99)
                ),
                unit="s",
                w=8,
            )
        )
        .with_row(row("Health checks, services, alerts"))
        .with_panel(
            timeline(
                "Health checks",
                "Each check's last result: 1 passing, 0 failing.",
                query(f"ikos_health_check_up{{{ONE}}}", "{{check}}"),
                w=12,
                h=8,
            )
        )
        .with_panel(
            graph(
                "Probes",
                "Health probes per second, by check and result.",
                query(
                    f"sum by (check, result) "
                    f"(rate(ikos_health_checks_total{{{ONE}}}[$__rate_interval]))",
                    "{{check}} {{result}}",
                ),
                unit="ops",
            )
        )
        .with_panel(
            listing(
                "Services",
                "The services the daemon provides: 1 when it runs and is healthy.",
                query(f"ikos_service_up{{{ONE}}}", instant=True),
                w=12,
            )
        )
        .with_panel(
            listing(
                "Alerts",
                "The alerts ikosd holds active on the daemon ([alerts] in ikos.toml).",
                query(f"ikos_alert_firing{{{ONE}}}", instant=True),
                w=12,
            )
        )
    )


def messaging() -> Any:
    """IPC broker, topics, queues and the registry."""
    b = board(
        "ikos-messaging",
        "ikos: messaging",
        "The IPC broker (clients, subscriptions, topics, durable queues) and the service registry.",
    )
    return (
        b.with_row(row("Broker"))
        .with_panel(
            single(
                "Broker up",
                "1 when the IPC broker answers ikosd.",
                query(f"max(ikos_ipc_broker_up{{{SEL}}})"),
                thresholds=((None, "red"), (1, "green")),
            )
        )
        .with_panel(
            single(
                "Clients", "Connections to the broker.", query(f"sum(ikos_ipc_clients{{{SEL}}})")
            )
        )
        .with_panel(
            single(
                "Subscriptions",
                "Topic subscriptions in the broker.",
                query(f"sum(ikos_ipc_subscriptions{{{SEL}}})"),
            )
        )
        .with_panel(
            single(
                "Registered services",
                "Services in the registry.",
                query(f"sum(ikos_registry_services{{{SEL}}})"),
            )
        )
        .with_panel(
            single(
                "Services down",
                "Registered services whose provider is not running or not healthy.",
                query(f"sum(1 - ikos_service_up{{{SEL}}})"),
                thresholds=((None, "green"), (1, "red")),
                w=8,
            )
        )
        .with_panel(
            graph(
                "Topics",
                "Messages published and deliveries made per second, by topic.",
                query(
                    f"sum by (topic) (rate(ikos_ipc_published_total{{{SEL}}}[$__rate_interval]))",
                    "{{topic}} published",
                ),
                query(
                    f"sum by (topic) (rate(ikos_ipc_delivered_total{{{SEL}}}[$__rate_interval]))",
                    "{{topic}} delivered",
                ),
                unit="ops",
            )
        )
        .with_panel(
            graph(
                "Drops",
                "Deliveries dropped for slow subscribers (drop-oldest), per subscriber and per "
                "topic, and deliveries skipped (pickle to another user), per topic.",
                query(
                    f"sum by (subscriber) "
                    f"(rate(ikos_ipc_subscriber_dropped_total{{{SEL}}}[$__rate_interval]))",
                    "{{subscriber}}",
                ),
                query(
                    f"sum by (topic) (rate(ikos_ipc_dropped_total{{{SEL}}}[$__rate_interval]))",
                    "{{topic}} dropped",
                ),
                query(
                    f"sum by (topic) "
                    f"(rate(ikos_ipc_undeliverable_total{{{SEL}}}[$__rate_interval]))",
                    "{{topic}} undeliverable",
                ),
                unit="ops",
            )
        )
        .with_row(row("Durable queues"))
        .with_panel(
            graph(
                "Messages",
                "Messages waiting in each queue, handed out and not acked (leased), and dead.",
                query(f"sum by (queue) (ikos_ipc_queue_messages{{{SEL}}})", "{{queue}}"),
                query(
                    f"sum by (queue) (ikos_ipc_queue_leased_messages{{{SEL}}})",
                    "{{queue}} leased",
                ),
                query(f"sum by (queue) (ikos_ipc_queue_dead_messages{{{SEL}}})", "{{queue}} dead"),
            )
        )
        .with_panel(
            graph(
                "Puts and acks",
                "Durable puts and acknowledgements per second, by queue.",
                query(
                    f"sum by (queue) (rate(ikos_ipc_queue_puts_total{{{SEL}}}[$__rate_interval]))",
                    "{{queue}} puts",
                ),
                query(
                    f"sum by (queue) (rate(ikos_ipc_queue_acks_total{{{SEL}}}[$__rate_interval]))",
                    "{{queue}} acks",
                ),
                unit="ops",
            )
        )
        .with_panel(
            graph(
                "Queue size",
                "Payload bytes held by each queue.",
                query(f"sum by (queue) (ikos_ipc_queue_bytes{{{SEL}}})", "{{queue}}"),
                unit="bytes",
            )
        )
        .with_row(row("Registry"))
        .with_panel(
            listing(
                "Services",
                "Every registered service and its provider: 1 when it runs and is healthy.",
                query(f"ikos_service_up{{{SEL}}}", instant=True),
            )
        )
    )


#: file name (in dashboards/) -> builder
DASHBOARDS = {"tree.json": tree, "daemon.json": daemon, "messaging.json": messaging}


def render(build: Any) -> str:
    """The JSON text of one dashboard, as committed: stable key order, trailing newline."""
    data = json.loads(json.dumps(build.build(), cls=JSONEncoder))
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a committed file is out of date"
    )
    args = parser.parse_args(argv)
    stale = []
    OUT.mkdir(exist_ok=True)
    for name, make in DASHBOARDS.items():
        text = render(make())
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python grafana/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
