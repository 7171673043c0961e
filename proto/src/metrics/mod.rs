//! Metrics both daemons export (feature `daemon`): [`Families`], the values one scrape
//! collects, encoded with `prometheus-client`; and [`http`], the `/metrics` endpoint.
//!
//! Both daemons collect at scrape time from the state they already keep (records,
//! sessions, sender statuses, the NBD counters): nothing is updated on their own paths
//! for the metrics' sake except the NBD atomics.

pub mod http;

pub use http::{MetricsConfig, MetricsListen, Render};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone)]
enum Value {
    Gauge(f64),
    Counter(u64),
    /// Buckets (upper bound, count in that bucket alone; the last is +Inf), count, sum.
    Histogram(Vec<(f64, u64)>, u64, f64),
}

#[derive(Debug, Clone)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    series: Vec<(Labels, Value)>,
}

/// The metric families of one scrape, in the order they were first named.
#[derive(Debug, Default, Clone)]
pub struct Families {
    families: Vec<Family>,
}

impl Families {
    fn family(&mut self, name: &'static str, help: &'static str, kind: MetricType) -> &mut Family {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family { name, help, kind, series: Vec::new() });
                self.families.len() - 1
            }
        };
        &mut self.families[i]
    }

    /// Declares a family with no series yet (so it is described even when empty).
    pub fn declare_gauge(&mut self, name: &'static str, help: &'static str) {
        self.family(name, help, MetricType::Gauge);
    }

    /// A gauge sample. `name` carries its unit suffix (`_seconds`, `_bytes`).
    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: Labels, v: f64) {
        self.family(name, help, MetricType::Gauge).series.push((labels, Value::Gauge(v)));
    }

    /// A counter sample; `name` without `_total` (the encoder adds it).
    pub fn counter(&mut self, name: &'static str, help: &'static str, labels: Labels, v: u64) {
        self.family(name, help, MetricType::Counter).series.push((labels, Value::Counter(v)));
    }

    /// A histogram: `buckets` (upper bound, count in that bucket alone, not cumulative)
    /// ending with +Inf; `count` and `sum` of the observations.
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Labels,
        buckets: Vec<(f64, u64)>,
        count: u64,
        sum: f64,
    ) {
        self.family(name, help, MetricType::Histogram).series.push((labels, Value::Histogram(buckets, count, sum)));
    }

    /// One series per state of `all`, 1 for `current` and 0 for the others.
    pub fn state_set(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &Labels,
        key: &'static str,
        all: &[&str],
        current: &str,
    ) {
        for s in all {
            let mut l = labels.clone();
            l.push((key, (*s).to_owned()));
            self.gauge(name, help, l, if *s == current { 1.0 } else { 0.0 });
        }
    }

    /// OpenMetrics text of every family.
    pub fn encode(self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            let mut m = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            for (labels, v) in &f.series {
                let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let mut e = m.encode_family(&labels)?;
                match v {
                    Value::Gauge(g) => e.encode_gauge(g)?,
                    Value::Counter(c) => e.encode_counter::<NoLabelSet, _, u64>(c, None)?,
                    // The encoder accumulates the buckets.
                    Value::Histogram(b, count, sum) => e.encode_histogram::<NoLabelSet>(*sum, *count, b, None)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_encode_as_openmetrics() {
        let mut f = Families::default();
        let vm = vec![("vm", "vm1".to_owned())];
        f.gauge("siterecovery_x_seconds", "A lag.", vm.clone(), 1.5);
        f.counter("siterecovery_y_bytes", "Bytes.", vm.clone(), 7);
        f.state_set("siterecovery_z", "A state.", &vm, "state", &["a", "b"], "b");
        f.histogram("siterecovery_h_seconds", "Latency.", vm, vec![(0.1, 1), (1.0, 1), (f64::INFINITY, 1)], 3, 4.5);
        let t = f.encode();
        for want in [
            "# TYPE siterecovery_x_seconds gauge\nsiterecovery_x_seconds{vm=\"vm1\"} 1.5\n",
            "siterecovery_y_bytes_total{vm=\"vm1\"} 7\n",
            "siterecovery_z{vm=\"vm1\",state=\"a\"} 0",
            "siterecovery_z{vm=\"vm1\",state=\"b\"} 1",
            "siterecovery_h_seconds_bucket{le=\"1.0\",vm=\"vm1\"} 2\n",
            "siterecovery_h_seconds_bucket{le=\"+Inf\",vm=\"vm1\"} 3\n",
            "siterecovery_h_seconds_count{vm=\"vm1\"} 3\n",
            "# EOF\n",
        ] {
            assert!(t.contains(want), "{want:?} missing in\n{t}");
        }
    }
}
