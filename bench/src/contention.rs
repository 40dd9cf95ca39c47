//! The thesis' contention experiment (section 5.4, Figure 5.8) with real
//! clients: two `mcd` testbed VMs (memcached servers) share one source
//! host's CPU budget; a client namespace loads both with memslap (set:get
//! 1:9) over a bridged user network separate from the shaped migration
//! link; one VM migrates away in a given mode, and the client-side
//! throughput and latency of *both* VMs, as memslap reports them every
//! second, show how fast each recovers.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use netsim::cpu::CpuBudget;
use netsim::lan::UserLan;
use netsim::{NetnsPair, Side, DST_IP};
use serde_json::{json, Value};
use testbed_abi::parse_size;

use crate::flowtap::{Bucket, FlowTap};
use crate::memslap::{self, Period};
use crate::migration::{api, migrate_via_api, unix_ms, Kill};

/// One run of the experiment.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub mode: String,
    pub rate_bps: u64,
    pub mem: String,
    /// CPUs the vCPUs of each host's VMs may use together (its cgroup's quota).
    pub host_cpus: f64,
    pub concurrency: u32,
    pub value: usize,
    /// Percent of guest RAM for each VM's store (`mcd,share=`).
    pub store_pct: u32,
    /// Percent of the store preloaded before the run (`mcd,fill=`): a warm
    /// cache, as in the thesis (its memcached VMs held ~80% of RAM in use).
    pub fill_pct: u32,
    /// Seconds the contending VM runs alone (its uncontended rate).
    pub alone_s: u64,
    /// Seconds both run contended before the migration.
    pub contended_s: u64,
    /// Seconds watched after the migration.
    pub after_s: u64,
}

const MAC_A: &str = "02:00:0a:00:1d:0a";
const MAC_B: &str = "02:00:0a:00:1d:0b";
const IP_A: &str = "10.0.29.10";
const IP_B: &str = "10.0.29.11";

fn wait_run_phase(vmm: &Path, sock: &Path) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if api(vmm, sock, "status").is_some_and(|st| st["workload"]["phase"] == "run") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("{} never reached its run phase", sock.display()))
}

fn series(periods: &[Period], epoch: u64) -> Value {
    Value::Array(
        periods
            .iter()
            .map(|p| json!({"t_ms": p.at_ms as i64 - epoch as i64, "ops_per_sec": p.tps, "avg_us": p.avg_us, "max_us": p.max_us}))
            .collect(),
    )
}

/// Milliseconds from `from_ms` until the end of the first memslap period
/// at >= 90% of `base` (counted from the migration start).
fn back_to_90(periods: &[Period], epoch: u64, base: f64) -> Option<i64> {
    periods.iter().find(|p| p.at_ms > epoch && p.tps >= 0.9 * base).map(|p| p.at_ms as i64 - epoch as i64)
}

/// Milliseconds from the migration start to the first 100 ms bucket from
/// which the mean throughput of the next 500 ms (five buckets) is at least
/// 90% of `base`: the moment the VM is back, smoothed over half a second.
/// (Until 2026-12-07 this was the *end* of that window, 500 ms later: the
/// time at which the recovery was known rather than when it happened.)
fn back_to_90_sustained(bs: &[Bucket], base: f64) -> Option<i64> {
    let from = bs.iter().position(|b| b.t_ms >= 0)?;
    bs[from..]
        .windows(5)
        .find(|w| w.iter().map(|b| b.ops_per_sec).sum::<f64>() / 5.0 >= 0.9 * base)
        .map(|w| w[0].t_ms.max(0))
}

/// Runs one scenario; returns the JSON result (`summary` + timelines).
pub fn run(vmm: &Path, sc: &Scenario, port: u16, workdir: &Path) -> Result<Value, String> {
    std::fs::create_dir_all(workdir).map_err(|e| e.to_string())?;
    // As on a real host, free memory is backed (see host_memory): three VMs' worth.
    let warm_ms = crate::host_memory::warm(3 * parse_size(&sc.mem).unwrap_or(1 << 30) as usize);
    eprintln!("  warmed host memory in {warm_ms:.0} ms");
    let pair = NetnsPair::create(Some(sc.rate_bps)).map_err(|e| format!("network namespaces: {e}"))?;
    let mut lan = UserLan::create(&pair).map_err(|e| format!("user network: {e}"))?;
    for (side, tap) in [(Side::Src, "tapa"), (Side::Src, "tapb"), (Side::Dst, "tapa")] {
        lan.add_tap(&pair, side, tap).map_err(|e| format!("TAP: {e}"))?;
    }
    let tag = format!("vmmbench-{}-{port}", std::process::id());
    // Each host's budget holds its VMs' vCPU threads (`vmm --vcpu-cgroup`); the VMMs' own
    // threads (devices, migration) run outside it, as the thesis' migration thread had a
    // core of its own (it saturated one at 10 Gbit/s) and as libvirt splits vcpu/emulator.
    let src_cg = CpuBudget::for_threads(&format!("{tag}-src"), sc.host_cpus).map_err(|e| format!("cgroup: {e}"))?;
    let dst_cg = CpuBudget::for_threads(&format!("{tag}-dst"), sc.host_cpus).map_err(|e| format!("cgroup: {e}"))?;
    // `ip netns exec` mounts a sysfs of its own, without the cgroup hierarchies: the VMMs
    // see this process's mounts through /proc/PID/root.
    let seen_from_netns = |cg: &CpuBudget| {
        PathBuf::from(format!("/proc/{}/root", std::process::id()))
            .join(cg.path().strip_prefix("/").unwrap_or(cg.path()))
    };
    let (src_vcpus, dst_vcpus) = (seen_from_netns(&src_cg), seen_from_netns(&dst_cg));
    let key = workdir.join("key");
    crate::write_key(&key, b"bench-contention-key-0123456789abcdef").map_err(|e| e.to_string())?;
    let cfg = workdir.join("memslap.cfg");
    std::fs::write(&cfg, memslap::config(sc.value)).map_err(|e| e.to_string())?;
    let sock = |n: &str| workdir.join(format!("{n}-{port}.sock"));
    for n in ["a", "b", "dst"] {
        let _ = std::fs::remove_file(sock(n));
    }
    let log = |name: &str| -> Stdio {
        std::fs::File::create(workdir.join(format!("{name}-{port}.log")))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    };
    let vm = |name: &str, ip: &str, mac: &str, tap: &str| -> Result<Kill, String> {
        let mut c = pair.command(Side::Src, &vmm.to_string_lossy());
        c.arg("--vcpu-cgroup")
            .arg(&src_vcpus)
            .args([
                "run",
                "--testbed",
                &format!("mcd,ip={ip}/24,value={},share={},fill={}", sc.value.max(4096), sc.store_pct, sc.fill_pct),
                "--mem",
                &sc.mem,
            ])
            .args(["--net", &format!("tap={tap},mac={mac}"), "--serial", "/dev/null", "--api-sock"])
            .arg(sock(name))
            .stdout(log(name))
            .stderr(log(&format!("{name}.err")));
        let child = c.spawn().map_err(|e| format!("starting VM {name}: {e}"))?;
        Ok(Kill(child))
    };
    let client = ["ip", "netns", "exec", lan.client_ns.as_str()];

    // Every request and answer on the client's interface, per 100 ms.
    let tap = FlowTap::start(&lan.client_ns, "cli0").map_err(|e| format!("packet tap on cli0: {e}"))?;
    let _vm_b = vm("b", IP_B, MAC_B, "tapb")?;
    wait_run_phase(vmm, &sock("b"))?;
    std::thread::sleep(Duration::from_millis(500));
    // B alone first; then again from when A runs (A's boot and preload take a while and
    // must not eat into B's contended and after-migration phases).
    let alone_ms = unix_ms();
    let (ok_alone, alone_b) = memslap::Run::start(&client, &format!("{IP_B}:11211"), &cfg, sc.concurrency, sc.alone_s)
        .map_err(|e| e.to_string())?
        .wait();
    let contention_ms = unix_ms();
    let _vm_a = vm("a", IP_A, MAC_A, "tapa")?;
    wait_run_phase(vmm, &sock("a"))?;
    let phase_s = sc.contended_s + sc.after_s + 4;
    let mslap_b = memslap::Run::start(&client, &format!("{IP_B}:11211"), &cfg, sc.concurrency, phase_s)
        .map_err(|e| e.to_string())?;
    let to = format!("{DST_IP}:{port}");
    let mut dst = pair.command(Side::Dst, &vmm.to_string_lossy());
    dst.arg("--vcpu-cgroup")
        .arg(&dst_vcpus)
        .args(["receive", "--listen", &to, "--key-file"])
        .arg(&key)
        .args(["--net", "tap=tapa", "--serial", "/dev/null", "--prealloc", &sc.mem, "--api-sock"])
        .arg(sock("dst"))
        .stdout(log("dst"))
        .stderr(log("dst.err"));
    let dst = Kill(dst.spawn().map_err(|e| format!("starting the destination: {e}"))?);
    let mslap_a = memslap::Run::start(&client, &format!("{IP_A}:11211"), &cfg, sc.concurrency, phase_s)
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_secs(sc.contended_s));

    let epoch = unix_ms();
    let report_path = workdir.join(format!("report-{port}.json"));
    let report = migrate_via_api(vmm, &sock("a"), &to, &sc.mode, &key, false, &report_path)?;
    let switch_port = lan.switch_port_of(MAC_A);
    let (ok_a, parsed_a) = mslap_a.wait();
    let (ok_b, mut parsed_b) = mslap_b.wait();
    let ok_b = ok_b && ok_alone;
    // B's rate alone: every period of its alone run but the first (a warm-up), or that
    // one if it is all there is (a short run's last period may not be printed).
    let alone_periods = &alone_b.periods[alone_b.periods.len().min(1)..];
    let alone_periods = if alone_periods.is_empty() { &alone_b.periods[..] } else { alone_periods };
    let uncontended = if alone_periods.is_empty() {
        0.0
    } else {
        alone_periods.iter().map(|p| p.tps).sum::<f64>() / alone_periods.len() as f64
    };
    eprintln!("  contending VM alone: {} memslap period(s), {uncontended:.0} ops/s", alone_b.periods.len());
    parsed_b.connection_errors += alone_b.connection_errors;
    parsed_b.periods.splice(0..0, alone_b.periods);
    let (pa, pb) = (&parsed_a.periods[..], &parsed_b.periods[..]);
    let samples = tap.finish();
    let dst_status = api(vmm, &sock("dst"), "status").unwrap_or(Value::Null);
    let _ = api(vmm, &sock("dst"), "shutdown");
    let _ = api(vmm, &sock("b"), "shutdown");
    drop(dst);

    let avg = |ps: &[Period], from: u64, to: u64| {
        let v: Vec<f64> = ps.iter().filter(|p| p.at_ms > from && p.at_ms <= to).map(|p| p.tps).collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    // Contended: both VMs, in the seconds before the migration.
    let contended_b = avg(pb, epoch.saturating_sub(sc.contended_s * 1000 - 1000), epoch);
    let contended_a = avg(pa, epoch.saturating_sub(sc.contended_s * 1000 - 1000), epoch);
    let total_ms = report["total_duration_ms"].as_f64().unwrap_or(0.0);
    let during: Vec<&Period> =
        pa.iter().filter(|p| p.at_ms > epoch && p.at_ms as f64 <= epoch as f64 + total_ms + 1000.0).collect();
    let max_lat_ms = during.iter().map(|p| p.max_us).fold(0.0, f64::max) / 1000.0;
    // The migrated VM's own uncontended rate: its last 3 s, alone on the destination host
    // (A never ran alone on the source). B's alone rate stands in if the migration left
    // less than 2 s after it.
    let after_migration = epoch + total_ms as u64 + 1000;
    let last_a = pa.last().map(|p| p.at_ms).unwrap_or(epoch);
    let settled = after_migration.max(last_a.saturating_sub(3000));
    let has_settled = last_a > after_migration + 1000;
    let migrated_ref = if has_settled { avg(pa, settled, last_a) } else { uncontended };
    // The same at 100 ms, from the packet tap.
    let end_ms = unix_ms();
    let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().expect("an IPv4 literal");
    let ta = samples.buckets(ip(IP_A), samples.start_unix_ms, end_ms, epoch, 100);
    let tb = samples.buckets(ip(IP_B), samples.start_unix_ms, end_ms, epoch, 100);
    let mean = |bs: &[Bucket], from: i64, to: i64| {
        let v: Vec<f64> = bs.iter().filter(|b| b.t_ms >= from && b.t_ms < to).map(|b| b.ops_per_sec).collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let rel = |unix: u64| unix as i64 - epoch as i64;
    // B alone, without its first second (connections and warm-up).
    let uncontended_tap = mean(&tb, rel(alone_ms) + 1000, rel(contention_ms));
    let migrated_ref_tap = if has_settled { mean(&ta, rel(settled), rel(last_a)) } else { uncontended_tap };
    let during = (epoch, epoch + total_ms as u64 + 1000);
    let tap = json!({
        "uncontended_ops_per_sec": uncontended_tap,
        "migrated_settled_ops_per_sec": migrated_ref_tap,
        "migrated_back_to_90pct_ms": back_to_90_sustained(&ta, migrated_ref_tap),
        "contending_back_to_90pct_ms": back_to_90_sustained(&tb, uncontended_tap),
        "migrated_p99_during_ms": samples.percentile(ip(IP_A), during.0, during.1, 0.99),
        "contending_p99_during_ms": samples.percentile(ip(IP_B), during.0, during.1, 0.99),
        "migrated_p90_during_ms": samples.percentile(ip(IP_A), during.0, during.1, 0.90),
        "answers_seen": samples.ops.len(),
    });
    let summary = json!({
        "mode": sc.mode,
        "rate_gbps": sc.rate_bps as f64 / 1e9,
        "store_pct": sc.store_pct,
        "fill_pct": sc.fill_pct,
        "migration_bytes": report["bytes"],
        "execution_transfer_ms": report["execution_transfer_ms"],
        "downtime_ms": report["downtime_ms"],
        "total_duration_ms": report["total_duration_ms"],
        "integrity": report["integrity"]["match"],
        "uncontended_ops_per_sec": uncontended,
        "contended_ops_per_sec": {"migrated": contended_a, "contending": contended_b},
        "migrated_settled_ops_per_sec": migrated_ref,
        "migrated_back_to_90pct_ms": back_to_90(pa, epoch, migrated_ref),
        "contending_back_to_90pct_ms": back_to_90(pb, epoch, uncontended),
        "migrated_max_latency_during_ms": max_lat_ms,
        "memslap_clean_exit": {"migrated": ok_a, "contending": ok_b},
        "memslap_connection_errors": parsed_a.connection_errors + parsed_b.connection_errors,
        "switch_port_after": switch_port,
        "dest_workload_errors": dst_status["workload"]["errors"],
        "tap_100ms": tap,
    });
    Ok(json!({
        "summary": summary,
        "epoch_ms": epoch,
        "contention_start_ms": contention_ms as i64 - epoch as i64,
        "migrated": series(pa, epoch),
        "contending": series(pb, epoch),
        "migrated_100ms": ta,
        "contending_100ms": tb,
        "report": report,
    }))
}

/// The median of each number in `runs` (summaries of repetitions of one
/// scenario), by the same key paths as the first run; anything else (and
/// numbers missing from some runs) as in the first. `runs` must not be empty.
pub fn median(runs: &[Value]) -> Value {
    fn at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
        path.iter().try_fold(v, |v, k| v.get(k))
    }
    fn walk(first: &Value, runs: &[Value], path: &mut Vec<String>) -> Value {
        match first {
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        path.push(k.clone());
                        let out = walk(v, runs, path);
                        path.pop();
                        (k.clone(), out)
                    })
                    .collect(),
            ),
            Value::Number(_) => {
                let mut xs: Vec<f64> = runs.iter().filter_map(|r| at(r, path)?.as_f64()).collect();
                if xs.len() != runs.len() {
                    return first.clone();
                }
                json!(crate::median(&mut xs))
            }
            other => other.clone(),
        }
    }
    walk(&runs[0], runs, &mut Vec::new())
}

/// A timeline plot (SVG, by plotters): both VMs' client throughput.
pub fn plot(result: &Value, title: &str) -> Result<String, String> {
    use plotters::prelude::*;
    let pts = |k: &str| -> Vec<(f64, f64)> {
        result[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["t_ms"].as_f64()? / 1000.0, p["ops_per_sec"].as_f64()? / 1000.0)))
            .collect()
    };
    let (a, b) = (pts("migrated"), pts("contending"));
    let (a100, b100) = (pts("migrated_100ms"), pts("contending_100ms"));
    let x0 = a.iter().chain(&b).map(|p| p.0).fold(0.0, f64::min) - 0.5;
    let x1 = a.iter().chain(&b).map(|p| p.0).fold(1.0, f64::max) + 0.5;
    let y1 = a.iter().chain(&b).chain(&a100).chain(&b100).map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let (a100, b100): (Vec<_>, Vec<_>) =
        (a100.into_iter().filter(|p| p.0 >= x0).collect(), b100.into_iter().filter(|p| p.0 >= x0).collect());
    let total_s = result["summary"]["total_duration_ms"].as_f64().unwrap_or(0.0) / 1000.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, 0.0..y1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("seconds since the migration started")
            .y_desc("client kops/s (memslap 1 s; tap 100 ms)")
            .draw()
            .map_err(|e| e.to_string())?;
        for (x, label) in [(0.0, "migration start"), (total_s, "last page")] {
            chart
                .draw_series(LineSeries::new([(x, 0.0), (x, y1)], BLACK.mix(0.4)))
                .map_err(|e| e.to_string())?
                .label(label);
        }
        chart.draw_series(LineSeries::new(a100, RED.mix(0.35))).map_err(|e| e.to_string())?;
        chart.draw_series(LineSeries::new(b100, BLUE.mix(0.35))).map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(a, RED.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label("migrated VM")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        chart
            .draw_series(LineSeries::new(b, BLUE.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label("contending VM")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_each_number_by_path() {
        let runs = [
            json!({"mode": "a", "x": 3, "t": {"y": 10.0, "z": null}, "only_first": 1}),
            json!({"mode": "b", "x": 1, "t": {"y": 30.0, "z": 5}}),
            json!({"mode": "c", "x": 2, "t": {"y": 20.0, "z": 6}}),
        ];
        let m = median(&runs);
        assert_eq!(m["mode"], "a");
        assert_eq!(m["x"], 2.0);
        assert_eq!(m["t"]["y"], 20.0);
        assert_eq!(m["t"]["z"], Value::Null);
        assert_eq!(m["only_first"], 1, "not in every run: the first run's");
        assert_eq!(median(&runs[..2])["x"], 2.0, "an even count: the mean of the middle two");
    }
}
