//! The contention experiment (issue 12): two memcached VMs on one host,
//! memslap clients, one VM migrated in each mode at each link rate.
//!
//!   contention-bench [--modes a,b,..] [--rates 1000,10000] [--mem 1G] [--host-cpus 0.25]
//!                    [--store 80] [--fill 80] [--reps 3] [--out DIR]

use std::path::PathBuf;
use std::process::ExitCode;

use bench::contention::{median, plot, run, Scenario};
use bench::migration::sibling_vmm;

fn main() -> ExitCode {
    let mut modes: Vec<String> =
        ["stop-and-copy", "precopy", "postcopy", "enlightened"].iter().map(|s| s.to_string()).collect();
    let mut rates = vec![1000u64, 10000];
    let mut mem = "1G".to_string();
    let mut host_cpus = 0.25;
    let (mut store_pct, mut fill_pct, mut reps) = (80u32, 80u32, 3usize);
    let mut out = PathBuf::from("target/contention-bench");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--modes" => modes = val().split(',').map(str::to_owned).collect(),
            "--rates" => rates = val().split(',').filter_map(|s| s.parse().ok()).collect(),
            "--mem" => mem = val(),
            "--host-cpus" => host_cpus = val().parse().unwrap_or(0.25),
            "--store" => store_pct = val().parse().unwrap_or(80),
            "--fill" => fill_pct = val().parse().unwrap_or(80),
            "--reps" => reps = val().parse::<usize>().unwrap_or(3).max(1),
            "--out" => out = PathBuf::from(val()),
            "-h" | "--help" => {
                println!(
                    "contention-bench [--modes stop-and-copy,precopy,postcopy,enlightened] [--rates 1000,10000] [--mem 1G]\n\
                     \x20                [--host-cpus 0.25] [--store 80] [--fill 80] [--reps 3] [--out target/contention-bench]\n\
                     Two `mcd` testbed VMs (memcached servers) share the source host's CPU budget (a cgroup per host\n\
                     namespace); memslap (Debian's memcaslap, set:get 1:9) loads both from a client namespace over a\n\
                     bridged user network; one VM migrates in each mode. Prints a table from memslap's own per-second\n\
                     output and, at 100 ms, from a packet tap on the client's interface that pairs each request\n\
                     with its answer (throughput, p90/p99 latency; `tap` columns: start of the first 500 ms window\n\
                     back at 90% of the uncontended rate). Writes <mode>-<rate>-<run>.json, <mode>-<rate>.svg (plotters) and\n\
                     contention.json. The destination prepares huge pages while it waits (`vmm receive --prealloc`).\n\
                     Each VM's store takes --store percent of its RAM and --fill percent of the store is preloaded\n\
                     before the run (a warm cache, like the thesis' VMs); each mode runs --reps times and the table\n\
                     shows medians (every run in contention.json, the first one's plot)."
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("contention-bench: unknown option `{other}` (see --help)");
                return ExitCode::from(2);
            }
        }
    }
    let vmm = sibling_vmm();
    let (mut rows, mut all, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    let mut port = 7600;
    for &rate in &rates {
        for mode in &modes {
            let mut runs = Vec::new();
            for rep in 0..reps {
                port += 1;
                let sc = Scenario {
                    mode: mode.clone(),
                    rate_bps: rate * 1_000_000,
                    mem: mem.clone(),
                    host_cpus,
                    concurrency: 16,
                    value: 1024,
                    store_pct,
                    fill_pct,
                    alone_s: 4,
                    contended_s: 5,
                    after_s: 10,
                };
                eprintln!("contention-bench: {mode} at {rate} Mbit/s, run {}/{reps} ...", rep + 1);
                match run(&vmm, &sc, port, &out) {
                    Ok(r) => {
                        if rep == 0 {
                            let title = format!("{mode}, {rate} Mbit/s: memslap throughput of both VMs");
                            match plot(&r, &title) {
                                Ok(svg) => {
                                    let _ = std::fs::write(out.join(format!("{mode}-{rate}.svg")), svg);
                                }
                                Err(e) => eprintln!("  plot: {e}"),
                            }
                        }
                        let _ = std::fs::write(out.join(format!("{mode}-{rate}-{}.json", rep + 1)), r.to_string());
                        eprintln!("  {}", r["summary"]);
                        runs.push(r["summary"].clone());
                    }
                    Err(e) => {
                        eprintln!("  failed: {e}");
                        failures.push(serde_json::json!({"mode": mode, "rate_gbps": rate as f64 / 1000.0, "error": e}));
                    }
                }
            }
            if !runs.is_empty() {
                let mut m = median(&runs);
                m["runs"] = serde_json::json!(runs.len());
                rows.push(m);
                all.push(serde_json::json!({"mode": mode, "rate_gbps": rate as f64 / 1000.0, "runs": runs}));
            }
        }
    }
    rows.extend(failures.iter().cloned());
    let doc = serde_json::json!({"medians": rows, "every_run": all, "failures": failures});
    let _ = std::fs::write(out.join("contention.json"), doc.to_string());
    println!("medians of {reps} run(s) per row; store {store_pct}% of RAM, {fill_pct}% of it preloaded");
    let f = |v: &serde_json::Value| v.as_f64().map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
    println!(
        "{:<14} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>10} {:>12} {:>12} {:>9}",
        "mode",
        "Gbit/s",
        "exec ms",
        "down ms",
        "total ms",
        "uncont/s",
        "cont/s",
        "dest/s",
        "mig 90% ms",
        "cont 90% ms",
        "max lat ms",
        "mig 90% tap",
        "cont 90% tap",
        "p99 ms"
    );
    let mut ok = true;
    for r in &rows {
        if r.get("error").is_some() {
            ok = false;
            println!("{:<14} {:>6} failed: {}", r["mode"].as_str().unwrap_or("?"), r["rate_gbps"], r["error"]);
            continue;
        }
        println!(
            "{:<14} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>10.1} {:>12} {:>12} {:>9.1}",
            r["mode"].as_str().unwrap_or("?"),
            r["rate_gbps"],
            f(&r["execution_transfer_ms"]),
            f(&r["downtime_ms"]),
            f(&r["total_duration_ms"]),
            f(&r["uncontended_ops_per_sec"]),
            f(&r["contended_ops_per_sec"]["contending"]),
            f(&r["migrated_settled_ops_per_sec"]),
            f(&r["migrated_back_to_90pct_ms"]),
            f(&r["contending_back_to_90pct_ms"]),
            r["migrated_max_latency_during_ms"].as_f64().unwrap_or(0.0),
            f(&r["tap_100ms"]["migrated_back_to_90pct_ms"]),
            f(&r["tap_100ms"]["contending_back_to_90pct_ms"]),
            r["tap_100ms"]["migrated_p99_during_ms"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "uncont/s: the contending VM alone before the other started; dest/s: the migrated VM's last 3 s alone\n\
         at the destination (its own uncontended rate, the reference of the `mig 90%` columns)"
    );
    for r in rows.iter().filter(|r| r["mode"] == "enlightened" && r.get("error").is_none()) {
        let n = |v: &serde_json::Value| v.as_f64();
        let (exec, total) = (n(&r["execution_transfer_ms"]).unwrap_or(0.0), n(&r["total_duration_ms"]).unwrap_or(0.0));
        let bound = 1.2 * exec + 1000.0;
        let verdict = |v: Option<f64>, limit: f64| match v {
            Some(x) if x <= limit => format!("{x:.0} ms <= {limit:.0} ms: met"),
            Some(x) => format!("{x:.0} ms > {limit:.0} ms: NOT met"),
            None => "never: NOT met".into(),
        };
        println!(
            "enlightened at {} Gbit/s (tap): contending back within 1.2 x exec + 1 s: {}; migrated back within the total duration: {}",
            r["rate_gbps"],
            verdict(n(&r["tap_100ms"]["contending_back_to_90pct_ms"]), bound),
            verdict(n(&r["tap_100ms"]["migrated_back_to_90pct_ms"]), total)
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
