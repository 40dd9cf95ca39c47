//! The testbed guest on KVM: every workload, multiple vCPUs, the API socket.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{path_str, vmm, vmm_bin, wait_output, TempDir};

const T: Duration = Duration::from_secs(120);

#[test]
fn kv_runs_without_errors() {
    let o = vmm(&["run", "--testbed", "kv,duration=2", "--mem", "256M"], T);
    assert_eq!(o.code, Some(0), "{o}");
    let j = o.json();
    assert_eq!(j["workload"], "kv", "{o}");
    assert_eq!(j["phase"], "done", "{o}");
    assert_eq!(j["exit"], "done", "{o}");
    assert_eq!(j["errors"], 0, "{o}");
    assert!(j["ops"].as_u64().unwrap() > 10_000, "{o}");
    assert!(j["ops_per_sec"].as_f64().unwrap() > 0.0, "{o}");
    assert!(j["run_seconds"].as_f64().unwrap() >= 1.9, "{o}");
}

#[test]
fn kv_on_two_vcpus() {
    let o = vmm(&["run", "--testbed", "kv,duration=2,share=20,value=256", "--mem", "256M", "--vcpus", "2"], T);
    assert_eq!(o.code, Some(0), "{o}");
    let j = o.json();
    assert_eq!(j["errors"], 0, "{o}");
    assert_eq!(j["vcpus"], 2, "{o}");
    assert!(j["ops"].as_u64().unwrap() > 10_000, "{o}");
}

#[test]
fn mem_dirties_its_working_set() {
    let o = vmm(&["run", "--testbed", "mem,duration=2,wss=32M", "--mem", "128M", "--vcpus", "2"], T);
    assert_eq!(o.code, Some(0), "{o}");
    let j = o.json();
    assert_eq!(j["workload"], "mem", "{o}");
    assert_eq!(j["errors"], 0, "{o}");
    assert!(j["ops"].as_u64().unwrap() > 0, "{o}");
}

#[test]
fn serial_to_file() {
    let d = TempDir::new("serial");
    let log = d.path("serial.log");
    let o = vmm(&["run", "--testbed", "kv,duration=1", "--mem", "128M", "--serial", path_str(&log)], T);
    assert_eq!(o.code, Some(0), "{o}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("testbed"), "serial log: {text}");
    // stdout then holds only the report.
    assert_eq!(o.stdout.lines().filter(|l| !l.is_empty()).count(), 1, "{o}");
}

fn api(sock: &str, cmd: &str) -> serde_json::Value {
    let out = Command::new(vmm_bin()).args(["api", "--api-sock", sock, cmd]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("api {cmd}: {e}: {out:?}"))
}

fn ops(sock: &str) -> u64 {
    api(sock, "status")["workload"]["ops"].as_u64().unwrap()
}

#[test]
fn api_status_pause_resume_shutdown() {
    let d = TempDir::new("api");
    let sock = d.path("api.sock");
    let sock = path_str(&sock).to_owned();
    let child = Command::new(vmm_bin())
        .args(["run", "--testbed", "kv,share=10", "--mem", "128M", "--api-sock", &sock])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !std::path::Path::new(&sock).exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "API socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Wait for the run phase.
    loop {
        let st = api(&sock, "status");
        assert_eq!(st["ok"], true);
        if st["workload"]["phase"] == "run" && st["workload"]["ops"].as_u64().unwrap() > 0 {
            assert_eq!(st["state"], "running");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never reached the run phase: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(api(&sock, "pause")["ok"], true);
    assert_eq!(api(&sock, "status")["state"], "paused");
    let a = ops(&sock);
    std::thread::sleep(Duration::from_millis(300));
    let b = ops(&sock);
    assert_eq!(a, b, "ops advanced while paused");
    assert_eq!(api(&sock, "resume")["ok"], true);
    assert_eq!(api(&sock, "resume")["ok"], false, "resume of a running VM must fail");
    let mut c = b;
    let t = Instant::now();
    while c == b && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        c = ops(&sock);
    }
    assert!(c > b, "ops did not advance after resume");
    assert_eq!(api(&sock, "bogus")["ok"], false);
    assert_eq!(api(&sock, "shutdown")["ok"], true);
    let o = wait_output(child, T);
    assert_eq!(o.code, Some(0), "{o}");
    assert_eq!(o.json()["exit"], "shutdown", "{o}");
    assert_eq!(o.json()["errors"], 0, "{o}");
    assert!(!std::path::Path::new(&sock).exists(), "socket file left behind");
}

#[test]
fn disk_reads_host_data_and_its_writes_land_in_the_file() {
    use std::os::unix::fs::FileExt;
    use testbed_workloads::disk::{header, sector_pattern, write_pattern, SECTOR};
    let d = TempDir::new("disk");
    let img = d.path("disk.img");
    let (host_seed, prepared, guest_seed) = (77u64, 2048u64, 5u64);
    {
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&header(host_seed, prepared), 0).unwrap();
        let mut s = [0u8; SECTOR];
        for sector in 1..=prepared {
            sector_pattern(host_seed, sector, &mut s);
            f.write_all_at(&s, sector * SECTOR as u64).unwrap();
        }
    }
    let spec = format!("disk,duration=1,size=1M,seed={guest_seed}");
    let o = vmm(&["run", "--testbed", &spec, "--disk", path_str(&img), "--mem", "128M"], T);
    assert_eq!(o.code, Some(0), "{o}");
    assert_eq!(o.json()["errors"], 0, "{o}");
    assert_eq!(o.json()["device_errors"], 0, "{o}");
    assert!(o.stdout.contains(&format!("verified host data: {prepared} sectors, 0 errors")), "{o}");
    // The guest's last round is on disk, right after the prepared sectors.
    let last: u64 = o
        .stdout
        .split("last round ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `last round` in the output\n{o}"));
    let f = std::fs::File::open(&img).unwrap();
    let (mut got, mut want) = ([0u8; SECTOR], [0u8; SECTOR]);
    for sector in prepared + 1..prepared + 1 + 2048 {
        f.read_exact_at(&mut got, sector * SECTOR as u64).unwrap();
        write_pattern(guest_seed, last, sector, &mut want);
        assert_eq!(got, want, "sector {sector} does not hold the guest's round-{last} data");
    }
    // The host-prepared data is untouched.
    f.read_exact_at(&mut got, prepared * SECTOR as u64).unwrap();
    sector_pattern(host_seed, prepared, &mut want);
    assert_eq!(got, want);
}
