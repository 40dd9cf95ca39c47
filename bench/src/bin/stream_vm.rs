//! stream-vm: issue 5's Table 3.2 and 3.3 from *real VM sessions*.
//!
//! 1. An appliance: a testbed `app` guest (a large prefilled state; it
//!    waits idle for a user session) in a multi-GiB VM is snapshotted and
//!    made into an appliance (`vmm appliance create`).
//! 2. Training: `--train` sessions of *different users* (session seed,
//!    number of features opened, think time) stream it with `vmm stream
//!    --mode demand` from a server on the loopback; each uploads its trace
//!    (network waits removed, thesis 3.3.3 step 4). `vmm appliance analyze`
//!    clusters them.
//! 3. Evaluation over the thesis' WAN (tbf between two network namespaces
//!    plus a relay adding the round trip), every session with a cold cache:
//!    a new user, not among the trained ones, under each policy (full
//!    download, demand only, VMTorrent's profile order, vTube: Table 3.3),
//!    then `--users` new users in all with vTube (Table 3.2). The guest
//!    verifies every page it reads and ends the VM when its session is over.
//!
//! Prints the table (launch time, session time, fetch ratio, buffering
//! ratio, buffering events per minute, miss rate) and writes JSON to
//! `--out`. Needs root (network namespaces).
//!
//! Usage: stream-vm [--mem 2G] [--state 320M] [--features 32] [--train 10] [--steps 8]
//!        [--think 2500] [--mbit 7.2] [--rtt-ms 120] [--modes full,demand,vmtorrent,vtube-thesis,vtube] [--users 3] [--min-p 0.6] [--interval S] [--lookout 2] [--out DIR]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bench::migration::{api, sibling_vmm, Kill};
use netsim::relay::Relay;
use netsim::{NetnsPair, Side, SRC_IP};
use serde_json::{json, Value};

struct Args {
    mem: String,
    state: String,
    features: u32,
    train: u32,
    steps: u32,
    think: u32,
    mbit: f64,
    rtt_ms: u64,
    modes: Vec<String>,
    users: u32,
    min_p: f64,
    interval: f64,
    lookout: f64,
    out: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: stream-vm [--mem 2G] [--state 320M] [--features 32] [--train 10] [--steps 8] [--think 2500] \
         [--mbit 7.2] [--rtt-ms 120] [--modes full,demand,vmtorrent,vtube-thesis,vtube] [--users 3] [--min-p 0.6] [--interval S] [--lookout 2] [--out DIR]"
    );
    std::process::exit(2)
}

fn parse() -> Args {
    let mut a = Args {
        mem: "2G".into(),
        state: "320M".into(),
        features: 32,
        train: 10,
        steps: 8,
        think: 2500,
        mbit: 7.2,
        rtt_ms: 120,
        modes: ["full", "demand", "vmtorrent", "vtube-thesis", "vtube"].map(String::from).to_vec(),
        users: 3,
        min_p: 0.6,
        interval: 2.0,
        lookout: 2.0,
        out: PathBuf::from("target/stream-vm"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--mem" => a.mem = val(),
            "--state" => a.state = val(),
            "--features" => a.features = val().parse().unwrap_or_else(|_| usage()),
            "--train" => a.train = val().parse().unwrap_or_else(|_| usage()),
            "--steps" => a.steps = val().parse().unwrap_or_else(|_| usage()),
            "--think" => a.think = val().parse().unwrap_or_else(|_| usage()),
            "--mbit" => a.mbit = val().parse().unwrap_or_else(|_| usage()),
            "--rtt-ms" => a.rtt_ms = val().parse().unwrap_or_else(|_| usage()),
            "--modes" => a.modes = val().split(',').map(String::from).collect(),
            "--lookout" => a.lookout = val().parse().unwrap_or_else(|_| usage()),
            "--interval" => a.interval = val().parse().unwrap_or_else(|_| usage()),
            "--min-p" => a.min_p = val().parse().unwrap_or_else(|_| usage()),
            "--users" => a.users = val().parse().unwrap_or_else(|_| usage()),
            "--out" => a.out = PathBuf::from(val()),
            _ => usage(),
        }
    }
    a
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(7140)
}

/// Boots the `app` guest, snapshots it idle, makes the appliance; returns `vmm appliance create`'s JSON.
fn make_appliance(vmm: &Path, a: &Args, dir: &Path, store: &Path) -> Value {
    let sock = dir.join("make.sock");
    let snap = dir.join("app.snap");
    let spec = format!("app,state={},features={},seed=1", a.state, a.features);
    let child = Command::new(vmm)
        .args(["run", "--testbed", &spec, "--mem", &a.mem, "--serial", "/dev/null", "--api-sock"])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("vmm run");
    let _vm = Kill(child);
    let t0 = Instant::now();
    loop {
        if api(vmm, &sock, "status").is_some_and(|s| s["workload"]["phase"] == "idle") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "the app guest never became idle");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Command::new(vmm).args(["snapshot", "--api-sock"]).arg(&sock).arg("-o").arg(&snap).output().unwrap();
    assert!(out.status.success(), "snapshot: {}", String::from_utf8_lossy(&out.stderr));
    let _ = api(vmm, &sock, "shutdown");
    let out = Command::new(vmm)
        .args(["appliance", "create", "--snapshot"])
        .arg(&snap)
        .arg("--store")
        .arg(store)
        .args(["--name", "app"])
        .output()
        .unwrap();
    assert!(out.status.success(), "appliance create: {}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_file(&snap);
    serde_json::from_slice(&out.stdout).expect("create report")
}

/// One `vmm stream` session to its end: (wall seconds, the guest's final JSON, the stream summary).
fn stream(
    mut c: Command,
    url: &str,
    cache: &Path,
    mode: &str,
    session: &str,
    upload: bool,
    tuning: &[String],
) -> (f64, Value, Value) {
    c.args(["stream", url, "--name", "app", "--mode", mode, "--session", session, "--serial", "/dev/null"]);
    c.args(tuning);
    c.arg("--cache").arg(cache);
    if !upload {
        c.arg("--no-upload");
    }
    let t0 = Instant::now();
    let out = c.output().expect("vmm stream");
    let wall = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vmm stream ({mode}, {session}) failed:\n{stdout}\n{stderr}");
    let guest: Value = stdout.lines().rev().find_map(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
    let summary: Value = stderr
        .lines()
        .find_map(|l| l.strip_prefix("stream: {").and_then(|r| serde_json::from_str(&format!("{{{r}")).ok()))
        .unwrap_or(Value::Null);
    assert_eq!(guest["errors"], 0, "the guest read wrong data: {guest}");
    (wall, guest, summary)
}

/// Table 3.2's metrics of one session.
fn metrics(label: &str, wall: f64, guest: &Value, s: &Value) -> Value {
    let n = |k: &str| s["session"][k].as_f64().unwrap_or(0.0);
    let accessed = n("accesses") - n("zero_reads");
    let fetched = s["client"]["chunks_fetched"].as_f64().unwrap_or(0.0);
    json!({
        "policy": label,
        "launch_s": n("launch_s"),
        "session_s": wall,
        "guest_run_s": guest["run_seconds"],
        "pages_read": guest["ops"],
        "accessed_chunks": accessed,
        "fetched_chunks": fetched,
        "fetched_mb": s["client"]["bytes"].as_f64().map(|b| b / 1e6),
        "fetch_ratio": fetched / accessed.max(1.0),
        "buffering_ratio": n("buffering_s") / wall,
        "buffering_events": n("buffering_events"),
        "buffering_events_per_min": n("buffering_events") / (wall / 60.0),
        "misses": n("misses"),
        "miss_rate": n("misses") / accessed.max(1.0),
        "hints": n("hints"),
        "late_reads": n("late_reads"),
        "readahead_chunks": n("readahead_chunks"),
        "prefetch_chunks": s["client"]["prefetch_chunks"],
        "demand_chunks": s["client"]["demand_chunks"],
        "prediction": s["prediction"],
    })
}

fn main() {
    let a = parse();
    let vmm = sibling_vmm();
    let dir = std::env::temp_dir().join(format!("stream-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let store = dir.join("store");

    let t0 = Instant::now();
    let created = make_appliance(&vmm, &a, &dir, &store);
    println!(
        "Appliance: {} guest, app state {} in {} features; {} chunks stored ({:.1} MB compressed), made in {:.1} s",
        a.mem,
        a.state,
        a.features,
        created["data_chunks"],
        created["stored_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        t0.elapsed().as_secs_f64()
    );

    // Training sessions over the loopback.
    let port = free_port();
    let local = Kill(
        Command::new(&vmm)
            .args(["appliance", "serve", "--store"])
            .arg(&store)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("server"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let url = format!("http://127.0.0.1:{port}");
    let mut training = Vec::new();
    for i in 0..a.train {
        // Different users: their own choices, a few more or fewer features, slower or faster.
        let steps = (a.steps as i64 + (i as i64 % 3) * 2 - 2).max(1);
        let think = a.think * [1, 2, 1, 3][i as usize % 4] / 2;
        let flow = [70, 60, 80, 70][i as usize % 4];
        let session = format!("app,seed={},steps={steps},think={think},flow={flow}", 100 + i);
        let (wall, g, s) = stream(Command::new(&vmm), &url, &dir.join("train-cache"), "demand", &session, true, &[]);
        println!(
            "training session {i}: `{session}`: {} pages read, {} chunks accessed, {:.1} s",
            g["ops"], s["session"]["accesses"], wall
        );
        training.push(json!({"session": session, "wall_s": wall, "pages_read": g["ops"]}));
    }
    drop(local);
    let out = Command::new(&vmm)
        .args(["appliance", "analyze", "--interval", &a.interval.to_string(), "--store"])
        .arg(&store)
        .arg("app")
        .output()
        .unwrap();
    assert!(out.status.success(), "analyze: {}", String::from_utf8_lossy(&out.stderr));
    let knowledge: Value = serde_json::from_slice(&out.stdout).expect("analysis");
    println!("Knowledge: {knowledge}");

    // The WAN.
    let pair = NetnsPair::create(Some((a.mbit * 1e6) as u64)).expect("network namespaces (run as root)");
    let wport = 7150;
    let mut server = pair.command(Side::Src, &vmm.to_string_lossy());
    server.args(["appliance", "serve", "--store"]).arg(&store).args(["--listen", &format!("{SRC_IP}:{wport}")]);
    let _server = Kill(server.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("WAN server"));
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let one_way = Duration::from_millis(a.rtt_ms / 2);
    let relay = pair
        .spawn_in(Side::Dst, move || {
            let r = Relay::bind("127.0.0.1:0", SocketAddr::from((SRC_IP, wport)), one_way).expect("relay");
            addr_tx.send(r.addr()).expect("relay address");
            let _ = stop_rx.recv();
            drop(r);
        })
        .expect("relay thread");
    let wan = format!("http://{}", addr_rx.recv().expect("relay address"));
    std::thread::sleep(Duration::from_millis(300));

    let full_s = created["stored_bytes"].as_f64().unwrap_or(0.0) * 8.0 / (a.mbit * 1e6);
    let dst = || pair.command(Side::Dst, &vmm.to_string_lossy());
    let tuned: Vec<String> =
        vec!["--lookout".into(), a.lookout.to_string(), "--min-probability".into(), a.min_p.to_string()];
    // The thesis' rule alone: equation 3.1 over a long lookout, no read-ahead.
    let thesis: Vec<String> =
        ["--lookout", "60", "--min-probability", "0", "--no-readahead"].map(String::from).to_vec();
    let run = |mode: &str, session: &str| {
        let cache = dir.join(format!("cache-{mode}"));
        let (label, stream_mode, tuning) = match mode {
            "full" => ("full download", "full", &tuned),
            "demand" => ("demand only", "demand", &tuned),
            "vmtorrent" => ("VMTorrent order", "vmtorrent", &tuned),
            "vtube-thesis" => ("vTube, thesis rule", "vtube", &thesis),
            "vtube" => ("vTube", "vtube", &tuned),
            _ => usage(),
        };
        let (wall, g, s) = stream(dst(), &wan, &cache, stream_mode, session, false, tuning);
        let _ = std::fs::remove_dir_all(&cache);
        let mut m = metrics(label, wall, &g, &s);
        m["session"] = session.into();
        m
    };
    let header = || {
        println!(
            "| policy | launch s | session s | accessed | fetched | fetch ratio | buffering ratio | buf events/min | misses | miss rate |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    };
    let row = |label: &str, m: &Value| {
        let f = |k: &str| m[k].as_f64().unwrap_or(0.0);
        println!(
            "| {label} | {:.1} | {:.1} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2}% |",
            f("launch_s"),
            f("session_s"),
            m["accessed_chunks"],
            m["fetched_chunks"],
            f("fetch_ratio"),
            f("buffering_ratio"),
            f("buffering_events_per_min"),
            m["misses"],
            f("miss_rate") * 100.0
        );
    };

    // New users, none among the training sessions: their own choices, a few
    // more or fewer features, faster or slower.
    let users: Vec<String> = (0..a.users.max(1))
        .map(|u| {
            let steps = (a.steps as i64 + [0, 2, -2][u as usize % 3]).max(1);
            let think = a.think * [2, 1, 3][u as usize % 3] / 2;
            format!("app,seed={},steps={steps},think={think}", 900 + u)
        })
        .collect();
    println!(
        "\n### Table 3.3: `{}` over {} Mbit/s, {} ms RTT (tbf + relay); a full download moves {:.1} MB: {full_s:.0} s at link rate\n",
        users[0],
        a.mbit,
        a.rtt_ms,
        created["stored_bytes"].as_f64().unwrap_or(0.0) / 1e6
    );
    header();
    let mut rows = Vec::new();
    for mode in &a.modes {
        let m = run(mode, &users[0]);
        row(m["policy"].as_str().unwrap_or("?"), &m);
        rows.push(m);
    }
    println!("\n### Table 3.2: vTube for {} new users\n", users.len());
    header();
    let mut vtube: Vec<Value> = rows.iter().filter(|m| m["policy"] == "vTube").cloned().collect();
    // (vTube with its measured tuning: --lookout, --min-probability, read-ahead.)
    for u in &users[vtube.len().min(1)..] {
        vtube.push(run("vtube", u));
    }
    for m in &vtube {
        row(&format!("`{}`", m["session"].as_str().unwrap_or("?")), m);
    }
    let mean = |k: &str| vtube.iter().map(|m| m[k].as_f64().unwrap_or(0.0)).sum::<f64>() / vtube.len().max(1) as f64;
    let (misses, accessed): (f64, f64) = vtube.iter().fold((0.0, 0.0), |(a, b), m| {
        (a + m["misses"].as_f64().unwrap_or(0.0), b + m["accessed_chunks"].as_f64().unwrap_or(0.0))
    });
    let fetched: f64 = vtube.iter().map(|m| m["fetched_chunks"].as_f64().unwrap_or(0.0)).sum();
    println!(
        "\nvTube over {} new users: launch {:.1} s (full download {full_s:.0} s), fetch ratio {:.2}, miss rate {:.2}%, \
         buffering ratio {:.2}, {:.2} buffering events/min",
        vtube.len(),
        mean("launch_s"),
        fetched / accessed.max(1.0),
        misses / accessed.max(1.0) * 100.0,
        mean("buffering_ratio"),
        mean("buffering_events_per_min")
    );
    let summary = json!({
        "users": vtube.len(),
        "launch_s_mean": mean("launch_s"),
        "fetch_ratio": fetched / accessed.max(1.0),
        "miss_rate": misses / accessed.max(1.0),
        "buffering_ratio_mean": mean("buffering_ratio"),
        "buffering_events_per_min_mean": mean("buffering_events_per_min"),
        "full_download_s": full_s,
    });
    let _ = stop_tx.send(());
    let _ = relay.join();
    drop(pair);
    let report = json!({
        "appliance": created,
        "training": training,
        "knowledge": knowledge,
        "link": {"mbit_s": a.mbit, "rtt_ms": a.rtt_ms},
        "min_probability": a.min_p,
        "clustering_interval_s": a.interval,
        "lookout_s": a.lookout,
        "full_download_s_at_link_rate": full_s,
        "policies": rows,
        "vtube_users": vtube,
        "vtube_summary": summary,
    });
    let _ = std::fs::create_dir_all(&a.out);
    let path = a.out.join("stream-vm.json");
    match std::fs::write(&path, format!("{report:#}\n")) {
        Ok(()) => println!("\nJSON: {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
