//! Reports ([`Report`], shared with the benchmark harness) and the clock
//! both hosts' timelines share.

use std::time::{Duration, Instant};

/// Milliseconds since the Unix epoch (timelines of both hosts share it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Calls `tick` every 100 ms (on a steady schedule) until it returns false.
pub fn every_100ms(mut tick: impl FnMut() -> bool) {
    let mut next = Instant::now();
    while tick() {
        next += Duration::from_millis(100);
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `vmm migrate`'s result: what the source measured, and for post-copy what
/// the destination reported. The benchmark harness reads the same type.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub mode: String,
    /// The destination (`HOST:PORT`).
    pub to: String,
    /// From the migration's start until the VM runs at the destination.
    pub execution_transfer_ms: f64,
    /// From the pause until the VM runs at the destination.
    pub downtime_ms: f64,
    /// From the start until the source holds nothing the destination needs.
    pub total_duration_ms: f64,
    pub bytes: ByteCounts,
    /// Pages the guest's free bitmap marked free that were sent anyway (0).
    pub free_pages_sent: u64,
    /// Pre-copy's rounds, or post-copy's push rounds.
    pub rounds: Vec<Value>,
    pub integrity: Integrity,
    pub timeline: Timeline,
    /// Stop-and-copy and pre-copy: pages sent with the VM paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_at_switchover: Option<u64>,
    #[serde(flatten)]
    pub postcopy: Option<Postcopy>,
}

impl Report {
    /// The report as JSON (the API's reply).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Bytes sent, by phase.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ByteCounts {
    #[serde(default)]
    pub precopy: u64,
    /// Pages and state sent with the VM paused (stop-and-copy, pre-copy).
    #[serde(default)]
    pub stop_and_copy: u64,
    /// Post-copy: the VM state.
    #[serde(default)]
    pub state: u64,
    #[serde(default)]
    pub push: u64,
    #[serde(default)]
    pub demand: u64,
    /// Enlightened: the free ranges.
    #[serde(default)]
    pub free_info: u64,
}

impl ByteCounts {
    pub fn total(&self) -> u64 {
        self.precopy + self.stop_and_copy + self.state + self.push + self.demand + self.free_info
    }
}

/// Source and destination memory compared (digest of every page's digest).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Integrity {
    #[serde(rename = "match")]
    pub matches: bool,
    pub source: String,
    pub destination: String,
    pub pages_compared: u64,
}

impl Integrity {
    pub fn of(source: [u8; 32], destination: [u8; 32], pages_compared: u64) -> Self {
        Integrity {
            matches: source == destination,
            source: blake3::Hash::from(source).to_hex().to_string(),
            destination: blake3::Hash::from(destination).to_hex().to_string(),
            pages_compared,
        }
    }
}

/// The guest's progress on both hosts, `[[unix_ms, ops], ...]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timeline {
    /// The migration's start (unix ms).
    pub epoch_ms: u64,
    #[serde(default)]
    pub source: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Value>,
}

/// Post-copy's own figures (flattened into the report).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Postcopy {
    /// Enlightened: the guest's Prepare to maps read.
    pub enlightenment_ms: f64,
    /// Pause until the free ranges are out.
    pub suspension_ms: f64,
    /// Pause until the state is out.
    pub state_transfer_ms: f64,
    pub pages: PageCounts,
    pub reconnections: u64,
    /// The guest's map summary (classes, free pages), from the VMM.
    pub enlightenment: Option<Value>,
    /// Per push round: pages, data pages, start and length.
    pub classes: serde_json::Map<String, Value>,
    /// The destination's statistics (faults, latencies, its timeline).
    pub destination: Value,
    /// Demand-fault latency at the destination.
    pub fault_latency_ms: Value,
}

/// Post-copy's page counts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PageCounts {
    pub total: u64,
    pub free: u64,
    pub demand: u64,
    pub demand_duplicates: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_through_json() {
        let copy = Report { mode: "precopy".into(), pages_at_switchover: Some(7), ..Default::default() };
        let v = copy.to_json();
        assert_eq!(v["integrity"]["match"], false);
        assert!(v.get("pages").is_none() && v.get("suspension_ms").is_none(), "{v}");
        let back: Report = serde_json::from_value(v).unwrap();
        assert!(back.postcopy.is_none());
        assert_eq!(back.pages_at_switchover, Some(7));

        let pc = Report {
            mode: "enlightened".into(),
            bytes: ByteCounts { push: 5, demand: 2, ..Default::default() },
            postcopy: Some(Postcopy { pages: PageCounts { free: 3, ..Default::default() }, ..Default::default() }),
            ..Default::default()
        };
        let v = pc.to_json();
        assert_eq!(v["pages"]["free"], 3, "post-copy's figures are top-level keys: {v}");
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back.postcopy.expect("post-copy figures").pages.free, 3);
        assert_eq!(back.bytes.total(), 7);
    }
}
