//! memslap (libmemcached's `memaslap`, Debian's `memcaslap`) as the client
//! of the contention experiment: its command line (set:get 1:9 through a
//! config file, as in the thesis' section 5.4.1) and a reader of its own
//! periodic output, each period line stamped with the time it arrived.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::migration::unix_ms;

/// One `Period` line of memslap's "Total Statistics" block.
#[derive(Clone, Debug, PartialEq)]
pub struct Period {
    /// When the line arrived (unix ms).
    pub at_ms: u64,
    /// Seconds since memslap started (its own `Time(s)` column).
    pub t_s: u64,
    pub ops: u64,
    pub tps: f64,
    pub min_us: f64,
    pub max_us: f64,
    pub avg_us: f64,
}

/// memslap's configuration: 64-byte keys, `value`-byte values, set:get 1:9.
pub fn config(value: usize) -> String {
    format!("key\n64 64 1\nvalue\n{value} {value} 1\ncmd\n0 0.1\n1 0.9\n")
}

/// Parses the periodic output; `stamp` gives each line's arrival time.
/// Only the `Period` row of each `Total Statistics` block counts.
pub struct Parser {
    in_total: bool,
    pub periods: Vec<Period>,
    pub connection_errors: u64,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    pub fn new() -> Self {
        Self { in_total: false, periods: Vec::new(), connection_errors: 0 }
    }

    pub fn line(&mut self, line: &str, at_ms: u64) {
        let l = line.trim_start_matches(|c: char| {
            c == '\x1b' || c == '[' || c.is_ascii_digit() || c == ';' || c == 'H' || c == 'J'
        });
        if l.contains("Statistics") {
            self.in_total = l.starts_with("Total Statistics") && !l.contains("events");
            return;
        }
        if l.contains("onnection")
            && (l.contains("refused") || l.contains("reset") || l.contains("closed") || l.contains("failed"))
        {
            self.connection_errors += 1;
        }
        let v: Vec<&str> = l.split_whitespace().collect();
        if self.in_total && v.len() >= 10 && v[0] == "Period" {
            let f = |i: usize| v[i].parse::<f64>().unwrap_or(0.0);
            self.periods.push(Period {
                at_ms,
                t_s: v[1].parse().unwrap_or(0),
                ops: v[2].parse().unwrap_or(0),
                tps: f(3),
                min_us: f(6),
                max_us: f(7),
                avg_us: f(8),
            });
            self.in_total = false;
        }
    }
}

/// A running memslap whose output is parsed as it arrives.
pub struct Run {
    child: Child,
    pub parsed: Arc<Mutex<Parser>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Run {
    /// Starts `memcaslap` (through `cmd_prefix`, e.g. `ip netns exec NS`)
    /// against `server` for `secs` seconds, printing every second.
    pub fn start(
        cmd_prefix: &[&str],
        server: &str,
        cfg: &std::path::Path,
        concurrency: u32,
        secs: u64,
    ) -> std::io::Result<Self> {
        let mut c = Command::new(cmd_prefix[0]);
        c.args(&cmd_prefix[1..]).args(["stdbuf", "-oL", "memcaslap", "-s", server, "-F"]).arg(cfg).args([
            "-T",
            "1",
            "-c",
            &concurrency.to_string(),
            "-t",
            &format!("{secs}s"),
            "-S",
            "1s",
        ]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = c.spawn().map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot start memcaslap (Debian package libmemcached-tools): {e}"))
        })?;
        let parsed = Arc::new(Mutex::new(Parser::new()));
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let p2 = parsed.clone();
        let p3 = parsed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                p3.lock().unwrap().line(&line, unix_ms());
            }
        });
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                p2.lock().unwrap().line(&line, unix_ms());
            }
        });
        Ok(Self { child, parsed, reader: Some(reader) })
    }

    /// Waits for memslap to finish; returns whether it exited cleanly.
    pub fn wait(mut self) -> (bool, Parser) {
        let ok = self.child.wait().map(|s| s.success()).unwrap_or(false);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let p = std::mem::take(&mut *self.parsed.lock().unwrap());
        (ok, p)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "servers: 10.0.19.15:11211\n\x1b[1;1H\x1b[2J\nGet Statistics\n\
Type     Time(s)  Ops          TPS(ops/s)   Net(M/s)   Get_miss   Min(us)  Max(us)    Avg(us)    Std_dev    Geo_dist  \n\
Period   1        9538         9538         9.9        0          675      7860       1501       316.76     1486.89\n\
Global   1        9538         9538         9.9        0          675      7860       1501       316.76     1486.89\n\n\
Total Statistics\n\
Type     Time(s)  Ops          TPS(ops/s)   Net(M/s)   Get_miss   Min(us)  Max(us)    Avg(us)    Std_dev    Geo_dist  \n\
Period   1        10604        10604        11.0       0          675      7860       1506       319.35     1491.98\n\
Global   1        10604        10604        11.0       0          675      7860       1506       319.35     1491.98\n\
\x1b[1;1H\x1b[2J\nTotal Statistics\n\
Type     Time(s)  Ops          TPS(ops/s)   Net(M/s)   Get_miss   Min(us)  Max(us)    Avg(us)    Std_dev    Geo_dist  \n\
Period   1        10162        10162        10.5       0          515      8167       1574       345.78     1558.91\n\
Total Statistics (32582 events)\n   Min:       726\n";

    #[test]
    fn reads_the_total_period_rows_of_memslaps_own_output() {
        let mut p = Parser::new();
        for (i, l) in SAMPLE.lines().enumerate() {
            p.line(l, 1000 + i as u64);
        }
        assert_eq!(p.periods.len(), 2, "{:?}", p.periods);
        assert_eq!((p.periods[0].ops, p.periods[0].tps, p.periods[0].avg_us), (10604, 10604.0, 1506.0));
        assert_eq!((p.periods[1].min_us, p.periods[1].max_us), (515.0, 8167.0));
        assert!(p.periods[0].at_ms < p.periods[1].at_ms);
    }

    #[test]
    fn the_config_asks_for_one_set_per_nine_gets() {
        let c = config(1024);
        assert!(c.contains("cmd\n0 0.1\n1 0.9\n") && c.contains("1024 1024 1"), "{c}");
    }
}
