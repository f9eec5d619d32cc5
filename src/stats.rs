//! Stats as data: each part's counters are declared once, in a table that gives both the
//! JSON of `/status` and the Prometheus families of `/metrics`.
//!
//! Why: with a struct of counters here, a `/status` view there and a list of metric names in
//! the admin module, a counter added to one was forgotten in the others. [`stats_table!`]
//! declares, from one list of fields, the struct of atomics that the hot path bumps, its plain
//! [`Serialize`](serde::Serialize) snapshot (what `/status` shows, field by field) and the
//! [`Table`] of metric rows that `/metrics` encodes. [`stats_snapshot!`] does the same for
//! values that are computed when asked (no atomics).
//!
//! A field's help is its metric's `# HELP` and the first line of its doc; `///` lines before
//! it add to the doc. A field's metric is `sekoia_forwarder_{prefix}_{field}`, or `_{prefix}_{name}` with
//! `as "name"`; fields that share a metric name (they must follow each other) are one family,
//! told apart by the label each one gives (`{ "status" = "400" }`).

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// What a metric is: a counter only goes up, a gauge is a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One row of a stats table: one field of a snapshot, as a metric.
#[derive(Debug)]
pub struct Field<S: 'static> {
    /// The snapshot's field, as `/status` names it.
    pub field: &'static str,
    /// The metric's name without `sekoia_forwarder_`.
    pub metric: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// What tells this row from the others of its family.
    pub label: Option<(&'static str, &'static str)>,
    pub value: fn(&S) -> u64,
}

/// A snapshot whose fields are metrics.
pub trait Table: Sized + 'static {
    const FIELDS: &'static [Field<Self>];
}

/// Encodes every family of `S`, one series per instance and row. `instances` gives each one
/// with the labels that tell it from the others (empty for a part that exists once).
pub fn encode<S: Table>(
    encoder: &mut DescriptorEncoder,
    instances: &[(Vec<(&str, &str)>, &S)],
) -> Result<(), std::fmt::Error> {
    for family in S::FIELDS.chunk_by(|a, b| a.metric == b.metric) {
        let first = &family[0];
        let metric_type = match first.kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
        };
        let name = format!("sekoia_forwarder_{}", first.metric);
        let mut descriptor = encoder.encode_descriptor(&name, first.help, None, metric_type)?;
        if let ([(labels, snapshot)], [row]) = (instances, family) {
            if labels.is_empty() && row.label.is_none() {
                // One series without labels: no `{}` after its name.
                encode_value(row, snapshot, descriptor)?;
                continue;
            }
        }
        for (labels, snapshot) in instances {
            for row in family {
                let mut all = labels.clone();
                all.extend(row.label);
                encode_value(row, snapshot, descriptor.encode_family(&all)?)?;
            }
        }
    }
    Ok(())
}

fn encode_value<S>(
    row: &Field<S>,
    snapshot: &S,
    series: prometheus_client::encoding::MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let value = (row.value)(snapshot);
    match row.kind {
        Kind::Counter => ConstCounter::new(value).encode(series),
        Kind::Gauge => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(series),
    }
}

/// Declares a snapshot of computed values and its [`Table`]:
///
/// ```ignore
/// stats_snapshot! {
///     /// What the queue holds now.
///     pub struct QueueLevels, metrics "queue" {
///         events: gauge, "Events waiting in the queue";
///         full: gauge, "1 while sources get back-pressure";
///     }
/// }
/// ```
macro_rules! stats_snapshot {
    (
        $(#[$meta:meta])*
        pub struct $snapshot:ident, metrics $prefix:literal {
            $(
                $(#[doc = $doc:literal])*
                $field:ident: $kind:ident $(as $metric:literal)? $({ $lname:literal = $lvalue:literal })?,
                $help:literal;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        pub struct $snapshot {
            $(
                #[doc = $help]
                $(#[doc = $doc])*
                pub $field: u64,
            )*
        }

        impl $crate::stats::Table for $snapshot {
            const FIELDS: &'static [$crate::stats::Field<Self>] = &[
                $(
                    $crate::stats::Field {
                        field: stringify!($field),
                        metric: $crate::stats::stats_snapshot!(@metric $prefix, $field $(, $metric)?),
                        help: $help,
                        kind: $crate::stats::stats_snapshot!(@kind $kind),
                        label: $crate::stats::stats_snapshot!(@label $($lname, $lvalue)?),
                        value: |s: &Self| s.$field,
                    },
                )*
            ];
        }
    };
    (@metric $prefix:literal, $field:ident) => { concat!($prefix, "_", stringify!($field)) };
    (@metric $prefix:literal, $field:ident, $metric:literal) => { concat!($prefix, "_", $metric) };
    (@kind counter) => { $crate::stats::Kind::Counter };
    (@kind gauge) => { $crate::stats::Kind::Gauge };
    (@label) => { None };
    (@label $name:literal, $value:literal) => { Some(($name, $value)) };
}

/// Declares a struct of atomic counters that the hot path bumps, with its snapshot and
/// [`Table`] (as [`stats_snapshot!`]) and `snapshot()`:
///
/// ```ignore
/// stats_table! {
///     /// Counters of delivery.
///     pub struct DeliveryStats => DeliverySnapshot, metrics "delivery" {
///         requests: counter, "Requests sent to the intake";
///         in_flight: gauge, "Requests on the wire";
///     }
/// }
/// ```
macro_rules! stats_table {
    (
        $(#[$meta:meta])*
        pub struct $stats:ident => $snapshot:ident, metrics $prefix:literal {
            $(
                $(#[doc = $doc:literal])*
                $field:ident: $kind:ident $(as $metric:literal)? $({ $lname:literal = $lvalue:literal })?,
                $help:literal;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $stats {
            $(
                #[doc = $help]
                $(#[doc = $doc])*
                pub $field: std::sync::atomic::AtomicU64,
            )*
        }

        impl $stats {
            /// Every counter, read now (each on its own: not one instant for all).
            pub fn snapshot(&self) -> $snapshot {
                $snapshot {
                    $($field: self.$field.load(std::sync::atomic::Ordering::Relaxed),)*
                }
            }
        }

        $crate::stats::stats_snapshot! {
            #[doc = concat!("What [`", stringify!($stats), "`] counted, read at one moment.")]
            pub struct $snapshot, metrics $prefix {
                $(
                    $(#[doc = $doc])*
                    $field: $kind $(as $metric)? $({ $lname = $lvalue })?, $help;
                )*
            }
        }
    };
}

pub(crate) use {stats_snapshot, stats_table};

#[cfg(test)]
mod tests {
    use prometheus_client::collector::Collector;
    use prometheus_client::registry::Registry;

    use super::*;

    stats_table! {
        /// Counters of a test part.
        pub struct PartStats => PartSnapshot, metrics "part" {
            requests: counter, "Requests";
            bytes: counter as "body_bytes", "Body bytes";
            rejected_400: counter as "rejected" { "status" = "400" }, "Requests refused";
            rejected_other: counter as "rejected" { "status" = "other" }, "Other refusals";
            in_flight: gauge, "Requests on the wire";
        }
    }

    #[derive(Debug)]
    struct Parts(Vec<(String, PartSnapshot)>);

    impl Collector for Parts {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let instances: Vec<_> = self
                .0
                .iter()
                .map(|(listen, s)| (vec![("listen", listen.as_str())], s))
                .collect();
            encode(&mut encoder, &instances)
        }
    }

    fn text(parts: Parts) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(parts));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn one_declaration_gives_the_snapshot_and_the_metrics() {
        let stats = PartStats::default();
        stats
            .requests
            .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        stats
            .rejected_400
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        stats
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshot = stats.snapshot();
        assert_eq!(
            serde_json::to_value(&snapshot).unwrap(),
            serde_json::json!({
                "requests": 3, "bytes": 0, "rejected_400": 2, "rejected_other": 0, "in_flight": 1
            })
        );
        let text = text(Parts(vec![
            ("a:1".into(), snapshot),
            ("b:2".into(), PartSnapshot::default()),
        ]));
        for line in [
            "# TYPE sekoia_forwarder_part_requests counter",
            "sekoia_forwarder_part_requests_total{listen=\"a:1\"} 3",
            "sekoia_forwarder_part_requests_total{listen=\"b:2\"} 0",
            "# HELP sekoia_forwarder_part_body_bytes Body bytes",
            "sekoia_forwarder_part_rejected_total{listen=\"a:1\",status=\"400\"} 2",
            "sekoia_forwarder_part_rejected_total{listen=\"a:1\",status=\"other\"} 0",
            "# TYPE sekoia_forwarder_part_in_flight gauge",
            "sekoia_forwarder_part_in_flight{listen=\"a:1\"} 1",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        // One family for the labelled rows: a second HELP would be invalid OpenMetrics.
        assert_eq!(
            text.matches("# HELP sekoia_forwarder_part_rejected ")
                .count(),
            1
        );
    }

    #[derive(Debug)]
    struct Once(PartSnapshot);

    impl Collector for Once {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode(&mut encoder, &[(Vec::new(), &self.0)])
        }
    }

    #[test]
    fn a_part_that_exists_once_has_no_labels() {
        let snapshot = PartSnapshot {
            requests: 5,
            ..PartSnapshot::default()
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Once(snapshot)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("\nsekoia_forwarder_part_requests_total 5\n"),
            "{text}"
        );
    }

    #[test]
    fn an_older_snapshot_without_a_field_reads_as_zero() {
        let snapshot: PartSnapshot = serde_json::from_str(r#"{"requests": 7}"#).unwrap();
        assert_eq!(snapshot.requests, 7);
        assert_eq!(snapshot.in_flight, 0);
    }
}
