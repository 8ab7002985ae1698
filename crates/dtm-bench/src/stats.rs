//! Latency statistics and the machine-readable result line.

use serde_json::{Map, Value};

/// Latency summary of one phase, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentile (`q` in 0..=100) of an ascending slice; 0 when empty.
pub fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let q = q.clamp(0.0, 100.0);
    // rank = ceil(q/100 * n), 1-based; q = 0 gives the minimum
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarise latencies given in microseconds (sorts them in place).
pub fn summarize(us: &mut [u32]) -> Latency {
    if us.is_empty() {
        return Latency::default();
    }
    us.sort_unstable();
    let ms = |v: u32| f64::from(v) / 1000.0;
    let sum: u64 = us.iter().map(|&v| u64::from(v)).sum();
    Latency {
        p50: ms(percentile(us, 50.0)),
        p90: ms(percentile(us, 90.0)),
        p99: ms(percentile(us, 99.0)),
        max: ms(percentile(us, 100.0)),
        mean: sum as f64 / us.len() as f64 / 1000.0,
    }
}

/// `num / den`, 0 when `den` is 0.
pub fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 { num / den } else { 0.0 }
}

/// Round to `d` decimals, for readable JSON.
pub fn round(v: f64, d: i32) -> f64 {
    let f = 10f64.powi(d);
    (v * f).round() / f
}

/// Builder of the one-line JSON result object. Keys keep insertion order only in the
/// sense that serde_json sorts them; the line is for machines.
#[derive(Debug, Default)]
pub struct JsonLine {
    map: Map<String, Value>,
}

impl JsonLine {
    pub fn new() -> JsonLine {
        JsonLine::default()
    }

    pub fn num(&mut self, k: &str, v: f64, decimals: i32) -> &mut Self {
        let v = if v.is_finite() {
            round(v, decimals)
        } else {
            0.0
        };
        self.map.insert(k.to_string(), serde_json::json!(v));
        self
    }

    pub fn int(&mut self, k: &str, v: u64) -> &mut Self {
        self.map.insert(k.to_string(), Value::from(v));
        self
    }

    pub fn text(&mut self, k: &str, v: &str) -> &mut Self {
        self.map.insert(k.to_string(), Value::from(v));
        self
    }

    pub fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.map.insert(k.to_string(), Value::from(v));
        self
    }

    pub fn value(&mut self, k: &str, v: Value) -> &mut Self {
        self.map.insert(k.to_string(), v);
        self
    }

    /// One line, no newline inside.
    pub fn render(&self) -> String {
        Value::Object(self.map.clone()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 90.0), 90);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        // 10 values: p99 is the largest, p50 the fifth
        let w: Vec<u32> = (1..=10).map(|x| x * 10).collect();
        assert_eq!(percentile(&w, 99.0), 100);
        assert_eq!(percentile(&w, 50.0), 50);
    }

    #[test]
    fn summary_in_ms() {
        let mut v = vec![3000, 1000, 2000, 4000];
        let s = summarize(&mut v);
        assert_eq!(v, vec![1000, 2000, 3000, 4000], "sorted in place");
        assert_eq!(s.p50, 2.0);
        assert_eq!(s.p99, 4.0);
        assert_eq!(s.max, 4.0);
        assert_eq!(s.mean, 2.5);
        assert_eq!(summarize(&mut []), Latency::default());
    }

    #[test]
    fn json_line_is_one_parsable_line() {
        let mut j = JsonLine::new();
        j.num("sagas_per_sec", 1234.5678, 1)
            .num("ratio", f64::NAN, 3)
            .int("errors", 0)
            .text("store", "sqlite")
            .bool("ok", true);
        let line = j.render();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        assert_eq!(v["sagas_per_sec"], serde_json::json!(1234.6));
        assert_eq!(v["ratio"], serde_json::json!(0.0), "NaN becomes 0");
        assert_eq!(v["errors"], serde_json::json!(0));
        assert_eq!(v["store"], "sqlite");
        assert_eq!(v["ok"], true);
    }

    #[test]
    fn ratio_guards_zero() {
        assert_eq!(ratio(1.0, 0.0), 0.0);
        assert_eq!(ratio(1.0, 4.0), 0.25);
    }
}
