//! Issue 4's comparison: the four modes at 1 and 10 Gbit/s, side by side,
//! with a `kv` guest dirtying memory (and stale data in its free memory).
//!
//!   migrate-bench [--mem SIZE] [--rates 1000,10000] [--modes a,b,..] [--tls on|off|both] [--out DIR]

use std::path::PathBuf;
use std::process::ExitCode;

use bench::migration::{run, sibling_vmm, svg, Scenario};

fn main() -> ExitCode {
    let mut mem = "2G".to_string();
    let mut rates = vec![1000u64, 10000];
    let mut modes: Vec<String> =
        ["stop-and-copy", "precopy", "postcopy", "enlightened"].iter().map(|s| s.to_string()).collect();
    let mut spec = "kv,share=20,value=1024,stale=40".to_string();
    let mut out = PathBuf::from("target/migrate-bench");
    let mut with_qemu = true;
    let mut vcpus = 1u32;
    let mut tls_runs = vec![true];
    let vmm = sibling_vmm();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--mem" => mem = val(),
            "--spec" => spec = val(),
            "--rates" => rates = val().split(',').filter_map(|s| s.parse().ok()).collect(),
            "--modes" => modes = val().split(',').map(str::to_owned).collect(),
            "--out" => out = PathBuf::from(val()),
            "--no-qemu" => with_qemu = false,
            "--vcpus" => vcpus = val().parse().unwrap_or(1),
            "--tls" => {
                tls_runs = match val().as_str() {
                    "on" => vec![true],
                    "off" => vec![false],
                    "both" => vec![true, false],
                    other => {
                        eprintln!("migrate-bench: --tls takes on, off or both, not `{other}`");
                        return ExitCode::from(2);
                    }
                }
            }
            "-h" | "--help" => {
                println!(
                    "migrate-bench [--mem 2G] [--spec {spec}] [--rates 1000,10000] [--modes ...] [--vcpus 1] [--tls on|off|both] [--no-qemu] [--out DIR]\n\
                     Runs each mode of `vmm migrate` and (unless --no-qemu) QEMU 10's pre-copy and post-copy\n\
                     (postcopy-preempt) on the same testbed guest and link; prints a table, writes JSON and SVG plots.\n\
                     --tls: our connections with TLS 1.3 (on, the default), plaintext (off, `--insecure`), or both\n\
                     side by side (the cost of the encryption)."
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("migrate-bench: unknown option `{other}`");
                return ExitCode::from(2);
            }
        }
    }
    let mut rows = Vec::new();
    let mut port = 7300;
    for &rate in &rates {
        for (mode, tls) in modes.iter().flat_map(|m| tls_runs.iter().map(move |&t| (m, t))) {
            port += 1;
            let sc = Scenario {
                insecure: !tls,
                mode: mode.clone(),
                rate_bps: rate * 1_000_000,
                spec: spec.clone(),
                mem: mem.clone(),
                vcpus,
                warmup_s: 2.0,
                after_s: 5.0,
            };
            let tag = if tls { "" } else { "-plaintext" };
            eprintln!("migrate-bench: {mode} at {rate} Mbit/s ({}) ...", if tls { "TLS" } else { "plaintext" });
            match run(&vmm, &sc, port, &out) {
                Ok(r) => {
                    let _ = std::fs::write(
                        out.join(format!("{mode}-{rate}{tag}.svg")),
                        svg(&r, &format!("{mode}, {mem} kv guest, {rate} Mbit/s")),
                    );
                    let _ = std::fs::write(out.join(format!("{mode}-{rate}{tag}.json")), r.to_string());
                    eprintln!("  {}", r["summary"]);
                    let mut row = r["summary"].clone();
                    row["tls"] = tls.into();
                    rows.push(row);
                }
                Err(e) => {
                    eprintln!("  failed: {e}");
                    rows.push(serde_json::json!({"mode": mode, "rate_gbps": rate as f64 / 1000.0, "error": e}));
                }
            }
        }
        if with_qemu {
            let elf = match bench::qemu::testbed_image(&vmm, &out) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("migrate-bench: {e}");
                    return ExitCode::FAILURE;
                }
            };
            for postcopy in [false, true] {
                port += 1;
                let sc = Scenario {
                    insecure: true,
                    mode: String::new(),
                    rate_bps: rate * 1_000_000,
                    spec: spec.clone(),
                    mem: mem.clone(),
                    vcpus: 1,
                    warmup_s: 2.0,
                    after_s: 5.0,
                };
                let name = if postcopy { "qemu-postcopy" } else { "qemu-precopy" };
                eprintln!("migrate-bench: {name} at {rate} Mbit/s ...");
                match bench::qemu::run(&elf, &sc, postcopy, port, &out) {
                    Ok(r) => {
                        let _ = std::fs::write(out.join(format!("{name}-{rate}.json")), r.to_string());
                        eprintln!("  {}", r);
                        let mut row = r.clone();
                        row.as_object_mut().map(|o| o.remove("qemu"));
                        rows.push(row);
                    }
                    Err(e) => {
                        eprintln!("  failed: {e}");
                        rows.push(serde_json::json!({"mode": name, "rate_gbps": rate as f64 / 1000.0, "error": e}));
                    }
                }
            }
        }
    }
    let f = |v: &serde_json::Value| v.as_f64().map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
    println!(
        "\n{:<14} {:>5} {:>6} {:>12} {:>10} {:>10} {:>9} {:>10} {:>12} {:>9}",
        "mode",
        "TLS",
        "Gbit/s",
        "exec xfer ms",
        "downtime",
        "total ms",
        "MiB sent",
        "fault p99",
        "back to 90%",
        "integrity"
    );
    for r in &rows {
        if r.get("error").is_some() {
            println!("{:<14} {:>6} failed: {}", r["mode"].as_str().unwrap_or(""), r["rate_gbps"], r["error"]);
            continue;
        }
        println!(
            "{:<14} {:>5} {:>6} {:>12} {:>10} {:>10} {:>9.0} {:>10} {:>12} {:>9}",
            r["mode"].as_str().unwrap_or(""),
            match r["tls"].as_bool() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            },
            r["rate_gbps"],
            f(&r["execution_transfer_ms"]),
            f(&r["downtime_ms"]),
            f(&r["total_duration_ms"]),
            r["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            r["fault_p99_ms"].as_f64().map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into()),
            match r["back_to_90pct_ms"].as_f64() {
                Some(v) => format!("{v:.0}"),
                None => format!(">{}", f(&r["watched_ms"])),
            },
            r["integrity"],
        );
    }
    let _ = std::fs::write(out.join("table.json"), serde_json::Value::Array(rows.clone()).to_string());
    eprintln!("migrate-bench: plots and reports in {}", out.display());
    if rows.iter().any(|r| r.get("error").is_some() || r["integrity"] != true) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
