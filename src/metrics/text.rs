//! Writing Prometheus's text exposition format: `# HELP` / `# TYPE` once per family,
//! samples with escaped label values, histograms as `_bucket` / `_sum` / `_count`.

use std::fmt::Write as _;

use crate::store::histogram::HistogramSnapshot;

/// A metric family's type.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Goes up and down.
    Gauge,
    /// Only goes up.
    Counter,
    /// Buckets, sum and count.
    Histogram,
}

/// The exposition being written.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl Text {
    /// Starts a family.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample without labels.
    pub fn sample(&mut self, name: &str, value: f64) {
        let _ = writeln!(self.out, "{name} {}", number(value));
    }

    /// One sample with labels.
    pub fn sample_labels(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let _ = writeln!(self.out, "{name}{{{}}} {}", labels.join(","), number(value));
    }

    /// A gauge family with one sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, value);
    }

    /// A counter family with one sample.
    pub fn counter(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, Kind::Counter, help);
        self.sample(name, value);
    }

    /// A histogram family.
    pub fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.family(name, Kind::Histogram, help);
        for (bound, n) in &h.buckets {
            self.sample_labels(
                &format!("{name}_bucket"),
                &[("le", &number(*bound))],
                *n as f64,
            );
        }
        self.sample_labels(&format!("{name}_bucket"), &[("le", "+Inf")], h.count as f64);
        self.sample(&format!("{name}_sum"), h.sum);
        self.sample(&format!("{name}_count"), h.count as f64);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_histograms_follow_the_text_format() {
        let mut t = Text::default();
        t.gauge("up", "Whether it is up", 1.0);
        t.family("q", Kind::Gauge, "Per queue");
        t.sample_labels("q", &[("queue", "a\"b")], 2.5);
        t.histogram(
            "lat",
            "Latency",
            &HistogramSnapshot {
                buckets: vec![(0.5, 1), (1.0, 3)],
                sum: 2.25,
                count: 4,
            },
        );
        assert_eq!(
            t.finish(),
            "# HELP up Whether it is up\n# TYPE up gauge\nup 1\n\
             # HELP q Per queue\n# TYPE q gauge\nq{queue=\"a\\\"b\"} 2.5\n\
             # HELP lat Latency\n# TYPE lat histogram\nlat_bucket{le=\"0.5\"} 1\n\
             lat_bucket{le=\"1\"} 3\nlat_bucket{le=\"+Inf\"} 4\nlat_sum 2.25\nlat_count 4\n"
        );
    }
}
