//! stream-sim: vTube's dynamic streaming against the baselines (full
//! download, demand fetch only, VMTorrent's profile order) on one appliance
//! and link, like thesis Table 3.3, plus the Table 3.2 metrics of each.
//!
//! The appliance and its sessions are synthetic (`appliance::synth`): an
//! image of 1 GiB memory and an 8 GiB disk with heavy-tailed application
//! features, sessions of 5 to 12 minutes with varied users. `--traces N`
//! sessions feed the clustering analysis; one further session, not among
//! them, is replayed through the link model under each policy.
//!
//! "vTube" is the thesis' algorithm as specified (P(Y|X) as a plain
//! frequency); "vTube, prior 1" estimates P(Y|X) = n(X then Y) / (n(X) + 1),
//! which keeps relations seen in a single trace from looking certain.
//! The last table replays the same test session with knowledge from fewer
//! traces (thesis Figure 3.19).
//!
//! Usage: stream-sim [--traces N] [--features N] [--scale X] [--seed N] [--lookout S] [--json]

use std::time::Instant;

use appliance::analysis::vmtorrent_profile;
use appliance::analysis::{analyze, AnalysisParams};
use appliance::planner::PlannerConfig;
use appliance::sim::{simulate, Link, Metrics, Policy};
use appliance::synth::{Model, SessionParams};

struct Args {
    traces: u64,
    features: usize,
    scale: f64,
    seed: u64,
    json: bool,
    lookout_s: f64,
}

fn usage() -> ! {
    eprintln!("usage: stream-sim [--traces N] [--features N] [--scale X] [--seed N] [--lookout S] [--json]");
    std::process::exit(2)
}

fn parse() -> Args {
    let mut a = Args { traces: 8, features: 60, scale: 1.0, seed: 5, json: false, lookout_s: 60.0 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--traces" => a.traces = val().parse().unwrap_or_else(|_| usage()),
            "--features" => a.features = val().parse().unwrap_or_else(|_| usage()),
            "--scale" => a.scale = val().parse().unwrap_or_else(|_| usage()),
            "--seed" => a.seed = val().parse().unwrap_or_else(|_| usage()),
            "--lookout" => a.lookout_s = val().parse().unwrap_or_else(|_| usage()),
            "--json" => a.json = true,
            _ => usage(),
        }
    }
    if a.traces == 0 {
        usage();
    }
    a
}

fn row(m: &Metrics) {
    println!(
        "| {:<16} | {:>8.1} | {:>8.1} | {:>8.1} | {:>8.1} | {:>6.2} | {:>8.1} | {:>6.2} | {:>6.2} | {:>7} | {:>6.2}% |",
        m.policy,
        m.launch_s,
        m.session_s,
        m.accessed_mb(),
        m.fetched_mb(),
        m.fetch_ratio,
        m.buffering_s,
        m.buffering_ratio,
        m.buffering_per_min,
        m.misses,
        m.miss_rate * 100.0
    );
}

fn main() {
    let a = parse();
    let t0 = Instant::now();
    let model = Model::new(a.seed, a.features, a.scale);
    let bytes = |k| model.bytes(k);
    let (img_chunks, img_bytes) = model.image();
    let train: Vec<_> = (0..a.traces).map(|i| model.session(&SessionParams::varied(i))).collect();
    let mut test_params = SessionParams::varied(1000 + a.seed);
    test_params.duration_s = 600.0;
    let test = model.session(&test_params);
    let t_analysis = Instant::now();
    let knowledge = analyze(&train, &bytes, &AnalysisParams::default()).expect("analysis");
    let analysis_s = t_analysis.elapsed().as_secs_f64();
    let knowledge_p1 = analyze(&train, &bytes, &AnalysisParams { prior: 1.0, ..Default::default() }).expect("analysis");
    let cfg = PlannerConfig { lookout_us: (a.lookout_s * 1e6) as u64, ..Default::default() };
    let profile = vmtorrent_profile(&train, &bytes);
    let kbytes = knowledge.to_bytes().len() as u64;
    // Manifest: 32 bytes per unique chunk plus runs; knowledge as JSON.
    let manifest_bytes = img_chunks * 32;
    let mut all = Vec::new();
    if !a.json {
        println!(
            "Appliance: {:.2} GiB of stored state ({} chunks, {:.2} GiB after compression); {} training traces of {:.0}-{:.0} s; \
             test session {:.0} s, not among them.",
            (img_chunks * 4096) as f64 / (1u64 << 30) as f64,
            img_chunks,
            img_bytes as f64 / (1u64 << 30) as f64,
            a.traces,
            train.iter().map(|t| t.span_us()).min().unwrap_or(0) as f64 / 1e6,
            train.iter().map(|t| t.span_us()).max().unwrap_or(0) as f64 / 1e6,
            test.span_us() as f64 / 1e6,
        );
        println!(
            "Analysis: {} clusters from {} traces in {:.2} s; knowledge file {:.1} MB; VMTorrent profile {} chunks.",
            knowledge.clusters.len(),
            a.traces,
            analysis_s,
            kbytes as f64 / 1e6,
            profile.len()
        );
    }
    for (mbit, rtt) in [(7.2, 120.0), (14.4, 60.0)] {
        let link = Link::new(mbit, rtt);
        let policies = [
            Policy::FullDownload { chunks: img_chunks, bytes: img_bytes },
            Policy::DemandOnly,
            Policy::VmTorrent { profile: &profile, window: 64, seed: a.seed },
            Policy::VTube { knowledge: &knowledge, cfg },
            Policy::VTube { knowledge: &knowledge_p1, cfg },
        ];
        if !a.json {
            println!("\n### {mbit} Mbit/s, {rtt} ms RTT\n");
            println!(
                "| policy           | launch s | session s | accessed MB | fetched MB | fetch ratio | buffering s | buf ratio | buf/min | misses | miss rate |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        }
        for (i, p) in policies.iter().enumerate() {
            let meta = manifest_bytes + if matches!(p, Policy::VTube { .. }) { kbytes } else { 0 };
            let mut m = simulate(&test, p, link, &bytes, meta);
            if i == 4 {
                m.policy = "vTube, prior 1".into();
            }
            if !a.json {
                row(&m);
            }
            all.push(serde_json::json!({"mbit": mbit, "rtt_ms": rtt, "metrics": m}));
        }
    }
    // Miss rate against the number of traces (thesis Figure 3.19).
    let link = Link::new(7.2, 120.0);
    if !a.json {
        println!(
            "\n### Trace coverage: the same test session, knowledge from the first N traces (7.2 Mbit/s, 120 ms)\n"
        );
        println!("| traces | clusters | fetch ratio | miss rate | buffering ratio |");
        println!("|---:|---:|---:|---:|---:|");
    }
    let mut n = 1;
    while n <= a.traces {
        let k = analyze(&train[..n as usize], &bytes, &AnalysisParams::default()).expect("analysis");
        let m = simulate(&test, &Policy::VTube { knowledge: &k, cfg }, link, &bytes, manifest_bytes);
        if !a.json {
            println!(
                "| {n} | {} | {:.2} | {:.2}% | {:.2} |",
                k.clusters.len(),
                m.fetch_ratio,
                m.miss_rate * 100.0,
                m.buffering_ratio
            );
        }
        all.push(serde_json::json!({"coverage_traces": n, "metrics": m}));
        n = if n * 2 > a.traces && n < a.traces { a.traces } else { n * 2 };
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all).expect("json"));
    } else {
        println!("\n(simulated in {:.1} s)", t0.elapsed().as_secs_f64());
    }
}
