//! QEMU 10 as the peer to beat: the same testbed guest (its multiboot
//! image), the same namespaces and link, QEMU's own pre-copy or post-copy
//! with postcopy-preempt, driven through QMP.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use netsim::{NetnsPair, Side, DST_IP};
use serde_json::{json, Value};

use crate::migration::Scenario;

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self, String> {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    return Err(format!("QMP {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let mut q = Qmp { r: BufReader::new(s.try_clone().map_err(|e| e.to_string())?), w: s };
        q.line()?; // greeting
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut l = String::new();
        self.r.read_line(&mut l).map_err(|e| format!("QMP: {e}"))?;
        if l.is_empty() {
            return Err("QMP: QEMU closed the connection".into());
        }
        serde_json::from_str(&l).map_err(|e| format!("QMP: {e}: {l}"))
    }

    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let req = json!({"execute": name, "arguments": args});
        writeln!(self.w, "{req}").map_err(|e| format!("QMP: {e}"))?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {name}: {e}"));
            }
            return Ok(v["return"].clone());
        }
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(pair: &NetnsPair, side: Side, elf: &Path, sc: &Scenario, dir: &Path, name: &str) -> Result<Kill, String> {
    let mut c = pair.command(side, "qemu-system-x86_64");
    c.args(["-enable-kvm", "-cpu", "qemu64,pni=off", "-m", &sc.mem, "-display", "none", "-no-reboot"])
        .args(["-monitor", "none", "-nodefaults"])
        .arg("-kernel")
        .arg(elf)
        .args(["-append", &sc.spec])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join(format!("{name}.serial")).display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", dir.join(format!("{name}.qmp")).display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).map(Stdio::from).unwrap_or(Stdio::null()));
    if side == Side::Dst {
        c.args(["-incoming", "defer"]);
    }
    c.spawn().map(Kill).map_err(|e| format!("starting QEMU (qemu-system-x86_64, QEMU 10; scripts/setup): {e}"))
}

/// `(seconds, cumulative ops, errors)` from the guest's serial progress lines.
fn progress(serial: &Path) -> Vec<(u64, u64, u64)> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("testbed: t=")?;
            let t = rest.split('s').next()?.parse().ok()?;
            let ops = rest.split("ops=").nth(1)?.split(' ').next()?.parse().ok()?;
            let err = rest.split("errors=").nth(1)?.trim().parse().ok()?;
            Some((t, ops, err))
        })
        .collect()
}

/// Migrates the testbed guest in QEMU: `postcopy` selects post-copy with
/// postcopy-preempt (switching as soon as the migration starts), otherwise
/// QEMU's pre-copy. Returns a summary row like `migration::summarize`.
pub fn run(elf: &Path, sc: &Scenario, postcopy: bool, port: u16, dir: &Path) -> Result<Value, String> {
    let pair = NetnsPair::create(Some(sc.rate_bps)).map_err(|e| format!("network namespaces: {e}"))?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let tag = if postcopy { "qemu-postcopy" } else { "qemu-precopy" };
    let (sname, dname) = (format!("{tag}-{port}-src"), format!("{tag}-{port}-dst"));
    for n in [&sname, &dname] {
        let _ = std::fs::remove_file(dir.join(format!("{n}.qmp")));
        let _ = std::fs::remove_file(dir.join(format!("{n}.serial")));
    }
    let _src = qemu(&pair, Side::Src, elf, sc, dir, &sname)?;
    let _dst = qemu(&pair, Side::Dst, elf, sc, dir, &dname)?;
    let src_serial = dir.join(format!("{sname}.serial"));
    let start = Instant::now();
    while progress(&src_serial).len() < 2 {
        if start.elapsed() > Duration::from_secs(180) {
            return Err("the guest in QEMU never reached its run phase".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs_f64(sc.warmup_s));
    let before = progress(&src_serial);
    let t0_wall = Instant::now();
    let base = match before.as_slice() {
        [.., a, b] => (b.1 - a.1) as f64 / (b.0 - a.0).max(1) as f64,
        _ => 0.0,
    };
    let mut qs = Qmp::connect(&dir.join(format!("{sname}.qmp")))?;
    let mut qd = Qmp::connect(&dir.join(format!("{dname}.qmp")))?;
    let caps: Vec<Value> = if postcopy {
        ["postcopy-ram", "postcopy-preempt"].iter().map(|c| json!({"capability": c, "state": true})).collect()
    } else {
        Vec::new()
    };
    qs.cmd("migrate-set-capabilities", json!({"capabilities": caps}))?;
    let mut dcaps = caps.clone();
    if postcopy {
        dcaps.push(json!({"capability": "postcopy-blocktime", "state": true}));
    }
    qd.cmd("migrate-set-capabilities", json!({"capabilities": dcaps}))?;
    // Unlimited bandwidth (QEMU's default cap is 128 MiB/s); the link limits.
    qs.cmd("migrate-set-parameters", json!({"max-bandwidth": 100_000_000_000u64, "downtime-limit": 300}))?;
    let uri = format!("tcp:{DST_IP}:{port}");
    qd.cmd("migrate-incoming", json!({"uri": uri}))?;
    let t0 = Instant::now();
    qs.cmd("migrate", json!({"uri": uri}))?;
    if postcopy {
        qs.cmd("migrate-start-postcopy", json!({}))?;
    }
    let info = loop {
        let v = qs.cmd("query-migrate", json!({}))?;
        match v["status"].as_str().unwrap_or("") {
            "completed" => break v,
            "failed" | "cancelled" => return Err(format!("QEMU migration {}: {v}", v["status"])),
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(600) {
            return Err("QEMU migration did not finish in 10 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let dinfo = qd.cmd("query-migrate", json!({})).unwrap_or(Value::Null);
    std::thread::sleep(Duration::from_secs_f64(sc.after_s.max(3.0)));
    let dst_prog = progress(&dir.join(format!("{dname}.serial")));
    // The guest prints its progress once a (guest) second; its clock runs on
    // across the migration. Guest time at the migration's start: the last
    // line before it, plus the time since (1 s resolution).
    let guest_t0 =
        before.last().map(|p| p.0 as f64).unwrap_or(0.0) + (t0 - t0_wall).as_secs_f64().clamp(0.0, 1.0) + 0.5;
    let back_ms = dst_prog
        .windows(2)
        .filter(|w| w[1].0 > w[0].0 && w[1].1 >= w[0].1)
        .find(|w| w[1].0 as f64 > guest_t0 && (w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0) as f64 >= 0.9 * base)
        .map(|w| ((w[1].0 as f64 - guest_t0) * 1000.0).max(0.0));
    let watched_ms = dst_prog.last().map(|p| (p.0 as f64 - guest_t0) * 1000.0);
    let errors = dst_prog.last().map(|p| p.2).unwrap_or(0) + before.last().map(|p| p.2).unwrap_or(0);
    let downtime = info["downtime"].as_f64();
    Ok(json!({
        "mode": tag,
        "rate_gbps": sc.rate_bps as f64 / 1e9,
        "execution_transfer_ms": if postcopy { info["setup-time"].as_f64().map(|s| s + downtime.unwrap_or(0.0)) } else { Some(wall_ms) },
        "downtime_ms": downtime,
        "total_duration_ms": info["total-time"].as_f64().unwrap_or(wall_ms),
        "bytes": info["ram"]["transferred"].as_u64().unwrap_or(0),
        "fault_p99_ms": null,
        "fault_mean_ms": dinfo["postcopy-latency"].as_u64().map(|ns| ns as f64 / 1e6),
        "postcopy_blocktime_ms": dinfo["postcopy-blocktime"],
        "ops_per_sec_before": base,
        "back_to_90pct_ms": back_ms,
        "watched_ms": watched_ms,
        "integrity": if dst_prog.len() >= 2 && errors == 0 { json!("guest-verified") } else { json!(false) },
        "guest_errors": errors,
        "qemu": info,
    }))
}

/// The testbed guest's multiboot image, written by `vmm testbed-image`.
pub fn testbed_image(vmm: &Path, dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let p = dir.join("testbed.elf");
    let st =
        std::process::Command::new(vmm).arg("testbed-image").arg("-o").arg(&p).status().map_err(|e| e.to_string())?;
    if !st.success() {
        return Err("vmm testbed-image failed".into());
    }
    Ok(p)
}
