//! What `status` shows of a migration, and the modes.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::transport::SharedCounting;
use std::io::Write;

/// Migration modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    StopAndCopy,
    Precopy,
    Postcopy,
    Enlightened,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        Ok(match s {
            "stop-and-copy" => Mode::StopAndCopy,
            "precopy" => Mode::Precopy,
            "postcopy" => Mode::Postcopy,
            "enlightened" => Mode::Enlightened,
            other => {
                return Err(Error::from(format!(
                    "unknown migration mode `{other}`; expected stop-and-copy, precopy, postcopy or enlightened"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::StopAndCopy => "stop-and-copy",
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Enlightened => "enlightened",
        }
    }
}

/// A migration in progress, as `status` shows it.
#[derive(Default)]
pub struct Progress {
    /// (mode, phase, start) of the migration; None when there is none.
    pub phase: std::sync::Mutex<Option<(&'static str, String, std::time::Instant)>>,
    /// Bytes written to the destination so far (all connections).
    pub bytes: Arc<std::sync::atomic::AtomicU64>,
    /// The operator asked to cancel (honoured until the switch-over).
    pub cancel: std::sync::atomic::AtomicBool,
    /// The switch-over is committed: cancelling would lose the VM.
    pub committed: std::sync::atomic::AtomicBool,
}

impl Progress {
    pub fn set(&self, mode: Mode, phase: &str) {
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let start = p.as_ref().map(|x| x.2).unwrap_or_else(std::time::Instant::now);
        *p = Some((mode.name(), phase.to_owned(), start));
    }
    pub fn start(&self, mode: Mode) {
        self.bytes.store(0, std::sync::atomic::Ordering::Relaxed);
        self.cancel.store(false, std::sync::atomic::Ordering::Release);
        self.committed.store(false, std::sync::atomic::Ordering::Release);
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((mode.name(), "connecting".into(), std::time::Instant::now()));
    }
    /// Err if the operator cancelled.
    pub fn check(&self) -> Result<()> {
        if self.cancel.load(std::sync::atomic::Ordering::Acquire) {
            Err(Error::from("cancelled by the operator"))
        } else {
            Ok(())
        }
    }

    /// Asks the migration in progress to stop.
    pub fn request_cancel(&self) -> Result<()> {
        if self.phase.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return Err(Error::from("no migration is in progress"));
        }
        if self.committed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::from(
                "too late to cancel: the VM already runs at the destination and this VMM holds the pages it \
                        still needs; the migration ends once they are delivered (restore the link if it is down)",
            ));
        }
        self.cancel.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    pub fn end(&self) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    pub fn json(&self) -> Option<serde_json::Value> {
        let p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let (mode, phase, start) = p.as_ref()?;
        let secs = start.elapsed().as_secs_f64();
        let bytes = self.bytes.load(std::sync::atomic::Ordering::Relaxed);
        Some(serde_json::json!({
            "mode": mode, "phase": phase, "elapsed_s": secs, "bytes_sent": bytes,
            "mbit_s": bytes as f64 * 8.0 / secs.max(1e-3) / 1e6,
        }))
    }
    /// A writer that counts into [`Self::bytes`].
    pub fn counting<W: Write>(&self, inner: W) -> SharedCounting<W> {
        SharedCounting::new(inner, self.bytes.clone())
    }
}
