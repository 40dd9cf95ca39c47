//! Helpers for tests that run the real `vmm` binary on KVM.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The JSON object on the last line of stdout.
    pub fn json(&self) -> serde_json::Value {
        let last = self.stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        serde_json::from_str(last).unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {last:?}\n{self}"))
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm")
}

/// Waits for a child with a deadline; kills it (and fails) if it hangs.
pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let o =
        Output { code: status.and_then(|s| s.code()), stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() };
    assert!(status.is_some(), "vmm hung for more than {timeout:?} and was killed\n{o}");
    o
}

/// Runs `vmm ARGS...` with a deadline.
pub fn vmm(args: &[&str], timeout: Duration) -> Output {
    let child = Command::new(vmm_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    wait_output(child, timeout)
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let p = std::env::temp_dir().join(format!("vmm-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Queries a VMM's API socket.
pub fn api(sock: &Path, cmd: &str) -> serde_json::Value {
    let out = Command::new(vmm_bin()).args(["api", "--api-sock", path_str(sock), cmd]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("api {cmd}: {e}: {out:?}"))
}

/// `vmm snapshot` of the VM behind `sock` to `path`; asserts success and
/// returns the reply.
pub fn snapshot(sock: &Path, path: &Path) -> serde_json::Value {
    let out = Command::new(vmm_bin())
        .args(["snapshot", "--api-sock", path_str(sock), "-o", path_str(path)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Waits for the API socket, then for the testbed's run phase; returns ops.
pub fn wait_for_run_phase(sock: &Path) -> u64 {
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "API socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    loop {
        // The socket file exists a moment before the VMM listens on it.
        let out = Command::new(vmm_bin()).args(["api", "--api-sock", path_str(sock), "status"]).output().unwrap();
        let Ok(st) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            assert!(start.elapsed() < Duration::from_secs(60), "the API never answered: {out:?}");
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if st["workload"]["phase"] == "run" && st["workload"]["ops"].as_u64().unwrap_or(0) > 0 {
            return st["workload"]["ops"].as_u64().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never reached the run phase: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a command with piped output.
pub fn spawn_piped(mut cmd: Command) -> Child {
    cmd.env("RUST_LOG", "info").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Starts `vmm ARGS` in one namespace of a pair, output piped.
pub fn spawn_in(pair: &netsim::NetnsPair, side: netsim::Side, args: &[&str]) -> Child {
    let mut c = pair.command(side, vmm_bin());
    c.args(args);
    spawn_piped(c)
}

/// `vmm migrate` in `mode`: (success, JSON report, stderr).
pub fn migrate_mode(sock: &Path, to: &str, key: &Path, mode: &str) -> (bool, serde_json::Value, String) {
    let out = Command::new(vmm_bin())
        .args(["migrate", "--api-sock", path_str(sock), "--to", to, "--mode", mode])
        .args(["--key-file", path_str(key)])
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), v, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Two hosts for a migration test: network namespaces joined at `rate`
/// bit/s, a shared key, and the destination (`vmm receive` on
/// `DST_IP:port`, its API on `dst_sock` once a VM runs there).
pub struct TwoHosts {
    pub pair: netsim::NetnsPair,
    pub dir: TempDir,
    pub key: PathBuf,
    pub src_sock: PathBuf,
    pub dst_sock: PathBuf,
    pub to: String,
    pub dst: Child,
}

impl TwoHosts {
    pub fn new(rate: u64, tag: &str, port: u16) -> Self {
        let pair = netsim::NetnsPair::create(Some(rate)).unwrap();
        let dir = TempDir::new(tag);
        let key = dir.path("key");
        write_key(&key, b"0123456789abcdef-test-migration-key");
        let (src_sock, dst_sock) = (dir.path("src.sock"), dir.path("dst.sock"));
        let to = format!("{}:{port}", netsim::DST_IP);
        let dst = spawn_in(
            &pair,
            netsim::Side::Dst,
            &["receive", "--listen", &to, "--key-file", path_str(&key), "--api-sock", path_str(&dst_sock)],
        );
        Self { pair, dir, key, src_sock, dst_sock, to, dst }
    }

    /// The source VM (`vmm run --testbed spec`) in the source namespace,
    /// once it is in its run phase.
    pub fn source(&self, spec: &str, mem: &str, vcpus: &str) -> Child {
        let src = spawn_in(
            &self.pair,
            netsim::Side::Src,
            &["run", "--testbed", spec, "--mem", mem, "--vcpus", vcpus, "--api-sock", path_str(&self.src_sock)],
        );
        wait_for_run_phase(&self.src_sock);
        src
    }
}

/// Writes a migration key file as `vmm keygen` would (mode 0600).
pub fn write_key(path: &Path, secret: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    f.write_all(secret).unwrap();
}
