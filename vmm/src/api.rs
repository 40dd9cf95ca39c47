//! The control socket: a Unix stream socket speaking one request per line.
//!
//! A request is a bare command (`status`) or a JSON object
//! (`{"command": "status"}`); every reply is one JSON object on one line with
//! `"ok": true|false` and, on failure, an `"error"` message. Commands:
//! `status`, `pause`, `resume`, `shutdown`, `snapshot PATH` (or
//! `{"command": "snapshot", "path": PATH}`), `migrate` and `enlighten`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

/// What the API server needs from the VM.
pub trait ApiTarget: Send + Sync {
    fn status(&self) -> Value;
    fn pause(&self) -> Result<(), String>;
    fn resume(&self) -> Result<(), String>;
    fn shutdown(&self);
    /// Writes a snapshot of the VM to `path`; returns details.
    fn snapshot(&self, path: &Path) -> Result<Value, String>;
    /// Migrates the VM (`to`, `mode`, `key_file` in the request); returns the report.
    fn migrate(&self, req: &Value) -> Result<Value, String>;
    /// Asks the guest for its free bitmap and priority map (enlightenment
    /// device); returns the summary.
    fn enlighten(&self) -> Result<Value, String> {
        Err("this VM has no enlightenment device".into())
    }
    /// Gives an `app` testbed guest its user session.
    fn session(&self, _spec: &str) -> Result<(), String> {
        Err("this VM takes no session".into())
    }
    /// Cancels the migration in progress (only before its switch-over).
    fn cancel_migration(&self) -> Result<(), String> {
        Err("no migration is in progress".into())
    }
    /// Called after each reply is written: requests that end the VM
    /// (shutdown, a completed migration) take effect here, so the client
    /// always receives its reply before the VMM exits.
    fn after_reply(&self) {}
    /// Called when a request arrives and when its reply has been written,
    /// so the VMM can let in-flight replies out before it exits.
    fn in_flight(&self, _delta: i32) {}
}

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// A parsed request: a command and its optional argument.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub command: String,
    pub path: Option<String>,
    /// The whole JSON request (commands with several arguments).
    pub json: Value,
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err("empty request".into());
    }
    if line.starts_with('{') {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("malformed JSON request: {e}"))?;
        let command = v
            .get("command")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| "JSON request lacks a string \"command\" field".to_string())?;
        let path = v.get("path").and_then(Value::as_str).map(str::to_owned);
        return Ok(Request { command, path, json: v });
    }
    let (command, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    Ok(Request { command: command.to_owned(), path: (!rest.is_empty()).then(|| rest.to_owned()), json: Value::Null })
}

/// Handles one request and returns the reply object.
pub fn handle(target: &dyn ApiTarget, line: &str) -> Value {
    let req = match parse_request(line) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": e}),
    };
    let done = |r: Result<(), String>| match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": e}),
    };
    match req.command.as_str() {
        "status" => {
            let mut s = target.status();
            if let Some(o) = s.as_object_mut() {
                o.insert("ok".into(), true.into());
            }
            s
        }
        "pause" => done(target.pause()),
        "resume" => done(target.resume()),
        "shutdown" => {
            target.shutdown();
            json!({"ok": true})
        }
        "snapshot" => match req.path {
            None => json!({"ok": false, "error": "snapshot needs a path: `snapshot /path/to/file`"}),
            Some(p) => match target.snapshot(Path::new(&p)) {
                Ok(mut v) => {
                    v["ok"] = true.into();
                    v
                }
                Err(e) => json!({"ok": false, "error": e}),
            },
        },
        "enlighten" => match target.enlighten() {
            Ok(mut v) => {
                v["ok"] = true.into();
                v
            }
            Err(e) => json!({"ok": false, "error": e}),
        },
        "migrate" => match target.migrate(&req.json) {
            Ok(mut v) => {
                v["ok"] = true.into();
                v
            }
            Err(e) => json!({"ok": false, "error": e}),
        },
        "migrate-cancel" => done(target.cancel_migration()),
        "session" => match req.path {
            None => json!({"ok": false, "error": "session needs a specification: `session app,seed=N,...`"}),
            Some(spec) => done(target.session(&spec)),
        },
        other => json!({
            "ok": false,
            "error": format!(
                "unknown command `{other}`; expected status, pause, resume, shutdown, snapshot PATH, migrate, \
                 migrate-cancel, enlighten or session SPEC"
            ),
        }),
    }
}

/// A listening API socket; the socket file is removed on drop.
pub struct ApiServer {
    path: PathBuf,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket file, refusing anything else)
    /// and serves requests on a background thread.
    pub fn start(path: &Path, target: Arc<dyn ApiTarget>) -> std::io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket; refusing to replace it", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by another running VMM", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::thread::Builder::new().name("api".into()).spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let t = target.clone();
                        let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || serve(stream, &*t));
                    }
                    Err(e) => log::warn!("api: accept failed: {e}"),
                }
            }
        })?;
        Ok(Self { path: path.to_owned() })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, target: &dyn ApiTarget) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream).take(MAX_REQUEST as u64);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if !line.ends_with('\n') && reader.limit() == 0 => {
                let _ = writeln!(writer, "{}", json!({"ok": false, "error": "request too long"}));
                return;
            }
            Ok(_) => {
                reader.set_limit(MAX_REQUEST as u64);
                target.in_flight(1);
                let reply = handle(target, &line);
                let written = writeln!(writer, "{reply}").and_then(|_| writer.flush());
                target.after_reply();
                target.in_flight(-1);
                if written.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = writeln!(writer, "{}", json!({"ok": false, "error": format!("bad request: {e}")}));
                return;
            }
        }
    }
}

use std::io::Read as _;

/// Client side: sends one command and returns the reply object.
pub fn request(path: &Path, command: &str) -> std::io::Result<Value> {
    request_with_timeout(path, command, Duration::from_secs(600))
}

/// As [`request`], waiting up to `timeout` for the reply.
pub fn request_with_timeout(path: &Path, command: &str, timeout: Duration) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot connect to {}: {e}", path.display())))?;
    s.set_read_timeout(Some(timeout))?;
    writeln!(s, "{command}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct Counter(AtomicU32);
    impl ApiTarget for Counter {
        fn status(&self) -> Value {
            json!({"state": "running", "calls": self.0.load(Ordering::SeqCst)})
        }
        fn pause(&self) -> Result<(), String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn resume(&self) -> Result<(), String> {
            Err("not paused".into())
        }
        fn shutdown(&self) {}
        fn snapshot(&self, path: &Path) -> Result<Value, String> {
            Ok(json!({"path": path.display().to_string()}))
        }
        fn migrate(&self, _req: &Value) -> Result<Value, String> {
            Err("no".into())
        }
    }

    #[test]
    fn requests_over_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("vmm-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let target = Arc::new(Counter::default());
        let server = ApiServer::start(&path, target.clone()).unwrap();
        assert!(ApiServer::start(&path, target.clone()).is_err(), "second server must not steal the socket");
        assert_eq!(request(&path, "pause").unwrap()["ok"], true);
        let st = request(&path, r#"{"command": "status"}"#).unwrap();
        assert_eq!(st["calls"], 1);
        assert_eq!(st["ok"], true);
        let r = request(&path, "resume").unwrap();
        assert_eq!(r["ok"], false);
        assert_eq!(r["error"], "not paused");
        assert_eq!(request(&path, "frobnicate").unwrap()["ok"], false);
        assert_eq!(request(&path, "snapshot /tmp/x.snap").unwrap()["path"], "/tmp/x.snap");
        assert_eq!(request(&path, r#"{"command":"snapshot","path":"/a b"}"#).unwrap()["path"], "/a b");
        assert_eq!(request(&path, "snapshot").unwrap()["ok"], false);
        assert_eq!(request(&path, "{not json").unwrap()["ok"], false);
        assert_eq!(request(&path, r#"{"cmd": 1}"#).unwrap()["ok"], false);
        drop(server);
        assert!(!path.exists());
        std::fs::write(&path, b"x").unwrap();
        assert!(ApiServer::start(&path, target).is_err(), "a regular file must not be replaced");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
