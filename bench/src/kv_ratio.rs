//! kv-ratio: the testbed `kv` workload as a plain host process and inside a
//! VM (`vmm run --testbed kv,...`), same code, same parameters, same
//! definition of ops/s (run phase only); prints both and their ratio.
//!
//! The host side runs twice: as a plain process (anonymous memory, the
//! kernel's default page policy: 4 KiB pages where THP is `madvise`) and with
//! the VM's page policy (MADV_HUGEPAGE, as the VMM asks for guest RAM), so
//! the ratio is shown against both baselines.
//!
//! Each of the three is run `--rounds` times, interleaved (host, host THP,
//! VM, host, ...), and the medians are compared, so a burst of load from
//! another process on the machine skews one sample, not the result.
//!
//! Usage: kv-ratio [--vmm PATH] [--seconds N] [--mem SIZE] [--rounds N]

use std::process::Command;
use std::time::Instant;

use testbed_abi::{parse_size, WorkloadSpec};
use testbed_workloads::kv::{Kv, KvConfig};

struct Args {
    vmm: String,
    seconds: u64,
    mem: u64,
    rounds: usize,
}

fn usage() -> ! {
    eprintln!("usage: kv-ratio [--vmm PATH] [--seconds N] [--mem SIZE] [--rounds N]");
    std::process::exit(2)
}

fn args() -> Args {
    let exe = std::env::current_exe().ok();
    let default_vmm = exe
        .as_ref()
        .and_then(|p| p.parent())
        .map(|d| d.join("vmm").to_string_lossy().into_owned())
        .unwrap_or_else(|| "vmm".into());
    let mut a = Args { vmm: default_vmm, seconds: 5, mem: 1 << 30, rounds: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--vmm" => a.vmm = v,
            "--seconds" => a.seconds = v.parse().unwrap_or_else(|_| usage()),
            "--mem" => a.mem = parse_size(&v).unwrap_or_else(|| usage()),
            "--rounds" => a.rounds = v.parse().ok().filter(|&n| n > 0).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    a
}

/// An anonymous mapping like the VMM's guest RAM.
fn map(bytes: usize, thp: bool) -> &'static mut [u64] {
    // SAFETY: a fresh private anonymous mapping, checked for failure and
    // never unmapped (the process exits after the benchmark).
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap of {bytes} bytes failed");
        if thp {
            libc::madvise(p, bytes, libc::MADV_HUGEPAGE);
        }
        std::slice::from_raw_parts_mut(p.cast(), bytes / 8)
    }
}

/// One `vmm run --testbed kv,...`; returns (ops/s, errors).
fn vm_run(a: &Args, spec_str: &str) -> (f64, u64) {
    let out = Command::new(&a.vmm)
        .args(["run", "--testbed", spec_str, "--mem", &a.mem.to_string(), "--serial", "/dev/null"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", a.vmm));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let report: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "vmm did not print a JSON report ({e}); stdout: {stdout}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let ops = report["ops_per_sec"].as_f64().unwrap_or(0.0);
    let errors = report["errors"].as_u64().unwrap_or(u64::MAX);
    eprintln!("VM (vmm on KVM): {ops:.0} ops/s ({} ops, {errors} errors)", report["ops"]);
    (ops, errors)
}

struct HostRun {
    ops_per_sec: f64,
    errors: u64,
}

/// The guest's clock: the TSC.
fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects and is allowed in user mode on Linux.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per second, measured against the monotonic clock over 100 ms
/// (the VMM hands the guest the kernel's TSC frequency; this is the same
/// figure to well under 0.1%).
fn tsc_hz() -> u64 {
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (c1, dt) = (rdtsc(), t0.elapsed().as_secs_f64());
    ((c1 - c0) as f64 / dt) as u64
}

/// Fills a store in fresh host memory and runs requests for `seconds`,
/// with the guest's run loop: the TSC is read every 64 requests, the run
/// phase ends at `start + seconds * tsc_hz`, and ops/s is run-phase ops over
/// run-phase TSC time.
fn host_run(cfg: &KvConfig, bytes: usize, seconds: u64, thp: bool, tps: u64) -> HostRun {
    let table = map(bytes, thp);
    let mut kv = Kv::new(table, *cfg).expect("store fits");
    let t = Instant::now();
    while !kv.is_filled() {
        kv.fill(4096);
    }
    let fill_s = t.elapsed().as_secs_f64();
    let start = rdtsc();
    let end = start + seconds * tps;
    let (mut ops, mut errors) = (0u64, 0u64);
    let stop = loop {
        let now = rdtsc();
        if now >= end {
            break now;
        }
        let b = kv.run(64);
        ops += b.ops;
        errors += b.errors;
    };
    let ops_per_sec = ops as f64 * tps as f64 / (stop - start) as f64;
    let what = if thp { "host process, MADV_HUGEPAGE" } else { "host process, plain" };
    eprintln!("{what}: {ops_per_sec:.0} ops/s ({ops} ops, {errors} errors, fill {fill_s:.2} s)");
    HostRun { ops_per_sec, errors }
}

fn main() {
    let a = args();
    let spec_str = format!("kv,duration={}", a.seconds);
    let spec = WorkloadSpec::parse(&spec_str).expect("valid spec");
    // The same sizing as the guest: share% of RAM, whole pages.
    let bytes = (a.mem / 100 * spec.kv.share_pct as u64) / 4096 * 4096;
    let cfg = KvConfig {
        value_size: spec.kv.value_size as usize,
        sets: spec.kv.sets,
        gets: spec.kv.gets,
        theta: spec.kv.theta_milli as f64 / 1000.0,
        seed: spec.seed,
    };
    eprintln!(
        "kv-ratio: {} MiB store ({}% of {} MiB), value {} B, SET:GET {}:{}, Zipf {}, {} s run",
        bytes >> 20,
        spec.kv.share_pct,
        a.mem >> 20,
        cfg.value_size,
        cfg.sets,
        cfg.gets,
        cfg.theta,
        a.seconds
    );

    let tps = tsc_hz();
    eprintln!("host TSC: {} kHz", tps / 1000);
    let (mut plain, mut thp, mut vm) = (Vec::new(), Vec::new(), Vec::new());
    let mut host_errors = 0;
    let mut vm_errors = 0;
    for round in 0..a.rounds {
        eprintln!("-- round {} of {}", round + 1, a.rounds);
        let p = host_run(&cfg, bytes as usize, a.seconds, false, tps);
        let t = host_run(&cfg, bytes as usize, a.seconds, true, tps);
        host_errors += p.errors + t.errors;
        plain.push(p.ops_per_sec);
        thp.push(t.ops_per_sec);
        let (ops, errors) = vm_run(&a, &spec_str);
        vm.push(ops);
        vm_errors += errors;
    }
    let (plain, thp, vm_ops) = (bench::median(&mut plain), bench::median(&mut thp), bench::median(&mut vm));
    eprintln!("medians: host plain {plain:.0}, host THP {thp:.0}, VM {vm_ops:.0} ops/s");
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    let (ratio_plain, ratio_thp) = (vm_ops / plain, vm_ops / thp);
    eprintln!("ratio VM / plain host process:            {ratio_plain:.3}");
    eprintln!("ratio VM / host process with THP advice:  {ratio_thp:.3}");
    println!(
        "{}",
        serde_json::json!({
            "bench": "kv-ratio",
            "mem_bytes": a.mem,
            "store_bytes": bytes,
            "seconds": a.seconds,
            "host_tsc_khz": tps / 1000,
            "rounds": a.rounds,
            "host_plain_ops_per_sec": plain.round(),
            "host_thp_ops_per_sec": thp.round(),
            "host_errors": host_errors,
            "vm_ops_per_sec": vm_ops.round(),
            "vm_errors": vm_errors,
            "ratio_vs_plain": r(ratio_plain),
            "ratio_vs_thp": r(ratio_thp),
        })
    );
}
