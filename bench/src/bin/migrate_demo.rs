//! The main job's demo: a testbed `kv` guest under load on one "host"
//! (network namespace), migrated to another over a 1 Gbit/s link with
//! enlightened post-copy; prints the report, a text timeline, and writes an
//! SVG plot.
//!
//!   migrate-demo [--mode MODE] [--rate-mbit N] [--mem SIZE] [--spec SPEC] [--out DIR]

use std::path::PathBuf;
use std::process::ExitCode;

use bench::migration::{run, sibling_vmm, sparkline, svg, Scenario};

fn main() -> ExitCode {
    let mut sc = Scenario {
        mode: "enlightened".into(),
        rate_bps: 1_000_000_000,
        spec: "kv,share=20,value=1024,stale=40".into(),
        mem: "2G".into(),
        vcpus: 2,
        warmup_s: 2.0,
        insecure: false,
        after_s: 2.0,
    };
    let mut out = PathBuf::from("target/demo");
    let mut vmm = sibling_vmm();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--mode" => sc.mode = val(),
            "--rate-mbit" => sc.rate_bps = val().parse::<u64>().unwrap_or(1000) * 1_000_000,
            "--mem" => sc.mem = val(),
            "--spec" => sc.spec = val(),
            "--out" => out = PathBuf::from(val()),
            "--vmm" => vmm = PathBuf::from(val()),
            "-h" | "--help" => {
                println!(
                    "migrate-demo: migrate a loaded testbed guest between two network namespaces\n\
                     options: --mode stop-and-copy|precopy|postcopy|enlightened (default enlightened)\n\
                     \x20        --rate-mbit N (default 1000)  --mem SIZE (default 2G)\n\
                     \x20        --spec WORKLOAD (default {})  --out DIR (default target/demo)  --vmm PATH",
                    sc.spec
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("migrate-demo: unknown option `{other}` (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    eprintln!(
        "migrate-demo: {} GiB-class `{}` guest, {} migration over {} Mbit/s between two network namespaces",
        sc.mem,
        sc.spec,
        sc.mode,
        sc.rate_bps / 1_000_000
    );
    let report = match run(&vmm, &sc, 7200, &out) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("migrate-demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut compact = report.clone();
    for k in ["timeline", "dest_status", "destination"] {
        compact.as_object_mut().map(|o| o.remove(k));
    }
    println!("{}", serde_json::to_string_pretty(&compact).unwrap_or_default());
    let plot = out.join(format!("migration-{}.svg", sc.mode));
    let title = format!("{} migration of a {} testbed kv guest at {} Mbit/s", sc.mode, sc.mem, sc.rate_bps / 1_000_000);
    if let Err(e) = std::fs::write(&plot, svg(&report, &title)) {
        eprintln!("migrate-demo: cannot write {}: {e}", plot.display());
    }
    let full = out.join(format!("report-{}.json", sc.mode));
    let _ = std::fs::write(&full, serde_json::to_string_pretty(&report).unwrap_or_default());
    println!("\n{}\n", sparkline(&report));
    println!("{}", serde_json::to_string(&report["summary"]).unwrap_or_default());
    eprintln!("migrate-demo: plot {} ; full report {}", plot.display(), full.display());
    if report["integrity"]["match"] != true {
        eprintln!("migrate-demo: INTEGRITY CHECK FAILED");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
