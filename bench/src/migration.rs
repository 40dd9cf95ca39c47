//! The migration harness: two "hosts" (network namespaces joined by a shaped
//! veth, `netsim`), a testbed guest under load on the source, one migration
//! in a given mode, and the figures issue 4 asks for: execution transfer
//! time, downtime, total duration, bytes, demand-fault p99, and the time
//! until the guest's throughput is back to 90% of its rate before.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netsim::{NetnsPair, Side, DST_IP};
use serde_json::{json, Value};

/// One migration to run.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub mode: String,
    pub rate_bps: u64,
    pub spec: String,
    pub mem: String,
    pub vcpus: u32,
    /// Seconds of load before the migration starts.
    pub warmup_s: f64,
    /// Seconds the destination is watched after the migration.
    pub after_s: f64,
    /// Plaintext (`--insecure` at both ends) instead of TLS.
    pub insecure: bool,
}

/// One `vmm api` request; `None` if the VMM did not answer with JSON.
pub fn api(vmm: &Path, sock: &Path, cmd: &str) -> Option<Value> {
    let out = Command::new(vmm).args(["api", "--api-sock"]).arg(sock).arg(cmd).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Milliseconds since the Unix epoch (timeline stamps).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A child process killed (and reaped) when this goes out of scope.
pub struct Kill(pub Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vmm migrate` of the VM behind `sock` to `to` in `mode`; the report it
/// prints, or why it failed.
pub fn migrate_via_api(
    vmm: &Path,
    sock: &Path,
    to: &str,
    mode: &str,
    key: &Path,
    insecure: bool,
    report_path: &Path,
) -> Result<Value, String> {
    let out = Command::new(vmm)
        .args(["migrate", "--api-sock"])
        .arg(sock)
        .args(["--to", to, "--mode", mode, "--key-file"])
        .arg(key)
        .args(insecure.then_some("--insecure"))
        .arg("--report")
        .arg(report_path)
        .output()
        .map_err(|e| e.to_string())?;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() || report.is_null() {
        return Err(format!(
            "{mode} migration failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(report)
}

/// Runs one scenario; returns the VMM's report extended with the harness's
/// figures (`summary`) and the destination's progress (`timeline.dest_api`).
pub fn run(vmm: &Path, sc: &Scenario, port: u16, workdir: &Path) -> Result<Value, String> {
    let pair = NetnsPair::create(Some(sc.rate_bps)).map_err(|e| format!("network namespaces: {e}"))?;
    std::fs::create_dir_all(workdir).map_err(|e| e.to_string())?;
    let key = workdir.join("key");
    crate::write_key(&key, b"bench-migration-key-0123456789abcdef").map_err(|e| e.to_string())?;
    let src_sock = workdir.join(format!("src-{port}.sock"));
    let dst_sock = workdir.join(format!("dst-{port}.sock"));
    let _ = std::fs::remove_file(&src_sock);
    let _ = std::fs::remove_file(&dst_sock);
    let to = format!("{DST_IP}:{port}");
    let log = |name: &str| -> Stdio {
        std::fs::File::create(workdir.join(name)).map(Stdio::from).unwrap_or_else(|_| Stdio::null())
    };
    let mut dst = pair.command(Side::Dst, &vmm.to_string_lossy());
    dst.args(["receive", "--listen", &to, "--key-file"])
        .arg(&key)
        .args(sc.insecure.then_some("--insecure"))
        .arg("--api-sock")
        .arg(&dst_sock)
        .args(["--serial", "/dev/null"])
        .stdout(log(&format!("dst-{port}.out")))
        .stderr(log(&format!("dst-{port}.err")));
    let dst = Kill(dst.spawn().map_err(|e| format!("starting the destination: {e}"))?);
    let mut src = pair.command(Side::Src, &vmm.to_string_lossy());
    src.args(["run", "--testbed", &sc.spec, "--mem", &sc.mem, "--vcpus", &sc.vcpus.to_string(), "--api-sock"])
        .arg(&src_sock)
        .args(["--serial", "/dev/null"])
        .stdout(log(&format!("src-{port}.out")))
        .stderr(log(&format!("src-{port}.err")));
    let _src = Kill(src.spawn().map_err(|e| format!("starting the source: {e}"))?);

    // Wait for the run phase, then let the load settle.
    let start = Instant::now();
    loop {
        if start.elapsed() > Duration::from_secs(300) {
            return Err("the source guest never reached its run phase".into());
        }
        if let Some(st) = api(vmm, &src_sock, "status") {
            if st["workload"]["phase"] == "run" {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs_f64(sc.warmup_s));

    let report_path = workdir.join(format!("report-{port}.json"));
    let mut report = migrate_via_api(vmm, &src_sock, &to, &sc.mode, &key, sc.insecure, &report_path)?;
    // Watch the destination.
    let mut dest_samples = Vec::new();
    let until = Instant::now() + Duration::from_secs_f64(sc.after_s);
    while Instant::now() < until {
        if let Some(st) = api(vmm, &dst_sock, "status") {
            if let Some(ops) = st["workload"]["ops"].as_u64() {
                dest_samples.push(json!([unix_ms(), ops]));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let dest_status = api(vmm, &dst_sock, "status").unwrap_or(Value::Null);
    let _ = api(vmm, &dst_sock, "shutdown");
    drop(dst);
    report["timeline"]["dest_api"] = Value::Array(dest_samples);
    report["dest_status"] = dest_status;
    report["summary"] = summarize(&report, sc);
    Ok(report)
}

/// Throughput series `(ms since migration start, ops/s)` from `[[unix_ms, ops]]`.
pub fn rates(samples: &Value, epoch_ms: u64) -> Vec<(f64, f64)> {
    let pts: Vec<(u64, u64)> =
        samples.as_array().into_iter().flatten().filter_map(|p| Some((p[0].as_u64()?, p[1].as_u64()?))).collect();
    pts.windows(2)
        .filter(|w| w[1].0 > w[0].0 && w[1].1 >= w[0].1)
        .map(|w| {
            let dt = (w[1].0 - w[0].0) as f64 / 1000.0;
            ((w[1].0 as f64 + w[0].0 as f64) / 2.0 - epoch_ms as f64, (w[1].1 - w[0].1) as f64 / dt)
        })
        .collect()
}

/// The destination's series: the VMM's own (post-copy) or the harness's.
pub fn dest_series(report: &Value) -> Vec<(f64, f64)> {
    let epoch = report["timeline"]["epoch_ms"].as_u64().unwrap_or(0);
    let own = rates(&report["timeline"]["destination"], epoch);
    let api = rates(&report["timeline"]["dest_api"], epoch);
    let mut all = own;
    let last = all.last().map(|p| p.0).unwrap_or(f64::MIN);
    all.extend(api.into_iter().filter(|p| p.0 > last));
    all
}

/// The harness's figures for one report.
pub fn summarize(report: &Value, sc: &Scenario) -> Value {
    let epoch = report["timeline"]["epoch_ms"].as_u64().unwrap_or(0);
    let src = rates(&report["timeline"]["source"], epoch);
    let before: Vec<f64> = src.iter().filter(|p| p.0 < 0.0 && p.0 > -2000.0).map(|p| p.1).collect();
    let base = if before.is_empty() { 0.0 } else { before.iter().sum::<f64>() / before.len() as f64 };
    let dst = dest_series(report);
    // First time (from migration start) a 500 ms window on the destination
    // runs at >= 90% of the rate before.
    let mut back_ms = None;
    for (i, p) in dst.iter().enumerate() {
        let w: Vec<f64> = dst[i..].iter().take_while(|q| q.0 < p.0 + 500.0).map(|q| q.1).collect();
        if w.len() >= 3 && w.iter().sum::<f64>() / w.len() as f64 >= 0.9 * base {
            back_ms = Some(p.0.max(0.0));
            break;
        }
    }
    // The engine's report, typed (the harness's own keys are ignored).
    let typed: Option<migrate::report::Report> = serde_json::from_value(report.clone()).ok();
    let Some(r) = typed else {
        return json!({"mode": sc.mode, "rate_gbps": sc.rate_bps as f64 / 1e9, "error": "malformed migration report"});
    };
    let fault_p99 = r.postcopy.as_ref().map(|p| p.fault_latency_ms["p99"].clone()).unwrap_or(Value::Null);
    json!({
        "mode": sc.mode,
        "rate_gbps": sc.rate_bps as f64 / 1e9,
        "execution_transfer_ms": r.execution_transfer_ms,
        "downtime_ms": r.downtime_ms,
        "total_duration_ms": r.total_duration_ms,
        "bytes": r.bytes.total(),
        "fault_p99_ms": fault_p99,
        "ops_per_sec_before": base,
        "back_to_90pct_ms": back_ms,
        // How far the destination was watched (for "not within").
        "watched_ms": dst.last().map(|p| p.0),
        "integrity": r.integrity.matches,
    })
}

/// A compact text timeline: one character per 100 ms of throughput.
pub fn sparkline(report: &Value) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let epoch = report["timeline"]["epoch_ms"].as_u64().unwrap_or(0);
    let src = rates(&report["timeline"]["source"], epoch);
    let dst = dest_series(report);
    let max = src.iter().chain(dst.iter()).map(|p| p.1).fold(1.0, f64::max);
    let line = |s: &[(f64, f64)]| -> String {
        s.iter().map(|p| BARS[((p.1 / max) * 7.0).round().clamp(0.0, 7.0) as usize]).collect()
    };
    format!(
        "source      {}|\ndestination {}{}\n            (one mark per 100 ms; '|' = migration start; peak {:.2} M ops/s)",
        line(&src.iter().filter(|p| p.0 < 0.0).copied().collect::<Vec<_>>()),
        " ".repeat(0),
        line(&dst),
        max / 1e6
    )
}

/// An SVG plot of the guest's throughput on both hosts around the migration.
pub fn svg(report: &Value, title: &str) -> String {
    let epoch = report["timeline"]["epoch_ms"].as_u64().unwrap_or(0);
    let src = rates(&report["timeline"]["source"], epoch);
    let dst = dest_series(report);
    let (w, h, l, r, t, b) = (900.0, 360.0, 70.0, 20.0, 40.0, 50.0);
    let xmin = src.first().map(|p| p.0).unwrap_or(0.0).min(0.0);
    let xmax = dst.last().map(|p| p.0).unwrap_or(1000.0).max(report["total_duration_ms"].as_f64().unwrap_or(0.0));
    let ymax = src.iter().chain(dst.iter()).map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let x = |v: f64| l + (v - xmin) / (xmax - xmin).max(1.0) * (w - l - r);
    let y = |v: f64| h - b - v / ymax * (h - t - b);
    let path = |s: &[(f64, f64)]| -> String {
        s.iter()
            .enumerate()
            .map(|(i, p)| format!("{}{:.1},{:.1}", if i == 0 { "M" } else { " L" }, x(p.0), y(p.1)))
            .collect()
    };
    let mut o = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n\
         <rect width='100%' height='100%' fill='white'/>\n<text x='{l}' y='22' font-size='15'>{title}</text>\n"
    );
    // Axes and ticks.
    o += &format!("<line x1='{l}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n", h - b, w - r, h - b);
    o += &format!("<line x1='{l}' y1='{t}' x2='{l}' y2='{}' stroke='black'/>\n", h - b);
    let step = ((xmax - xmin) / 8.0 / 500.0).ceil().max(1.0) * 500.0;
    let mut tick = (xmin / step).ceil() * step;
    while tick <= xmax {
        o += &format!(
            "<text x='{:.1}' y='{}' text-anchor='middle'>{:.1}</text>\n",
            x(tick),
            h - b + 16.0,
            tick / 1000.0
        );
        tick += step;
    }
    o += &format!(
        "<text x='{}' y='{}' text-anchor='middle'>seconds since the migration started</text>\n",
        (l + w - r) / 2.0,
        h - 12.0
    );
    for i in 0..=4 {
        let v = ymax / 1.1 * i as f64 / 4.0;
        o += &format!("<text x='{}' y='{:.1}' text-anchor='end'>{:.2}M</text>\n", l - 6.0, y(v) + 4.0, v / 1e6);
    }
    o += &format!(
        "<text x='16' y='{}' transform='rotate(-90 16 {})' text-anchor='middle'>guest ops/s</text>\n",
        (t + h - b) / 2.0,
        (t + h - b) / 2.0
    );
    // Events.
    let mut ev = vec![(0.0, "start".to_string())];
    if let Some(v) = report["execution_transfer_ms"].as_f64() {
        ev.push((v, "runs at destination".into()));
    }
    if let Some(v) = report["total_duration_ms"].as_f64() {
        ev.push((v, "complete".into()));
    }
    for (i, (v, name)) in ev.iter().enumerate() {
        o += &format!(
            "<line x1='{:.1}' y1='{t}' x2='{:.1}' y2='{}' stroke='#888' stroke-dasharray='4 3'/>\n<text x='{:.1}' y='{}' fill='#555'>{name}</text>\n",
            x(*v), x(*v), h - b, x(*v) + 3.0, t + 12.0 + 13.0 * i as f64
        );
    }
    o += &format!("<path d='{}' fill='none' stroke='#1f77b4' stroke-width='2'/>\n", path(&src));
    o += &format!("<path d='{}' fill='none' stroke='#ff7f0e' stroke-width='2'/>\n", path(&dst));
    o += &format!(
        "<text x='{}' y='{}' fill='#1f77b4'>source</text><text x='{}' y='{}' fill='#ff7f0e'>destination</text>\n",
        w - r - 150.0,
        t + 12.0,
        w - r - 90.0,
        t + 12.0
    );
    o += "</svg>\n";
    o
}

/// The path of the `vmm` binary next to this one (same profile).
pub fn sibling_vmm() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name("vmm")
}
