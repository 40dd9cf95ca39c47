//! Run control shared by the vCPU threads, the API server and the main thread:
//! pause/resume with acknowledgement, park, and the first reason the VM ended.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The testbed guest wrote this code to its exit port.
    GuestExit(u32),
    /// The guest reset the machine (i8042) or asked KVM for a reset/shutdown.
    GuestReset,
    /// An operator asked for shutdown through the API socket.
    Shutdown,
    /// The VM now runs on another host.
    Migrated,
    /// A vCPU hit something it cannot continue from.
    Fault { vcpu: u32, message: String },
}

#[derive(Default)]
struct State {
    pause_requested: bool,
    /// vCPUs currently stopped for a pause.
    paused: u32,
    /// vCPUs that parked or ended; they count as paused.
    parked: u32,
    exit: Option<ExitReason>,
}

/// Shared run-state of one VM.
pub struct Control {
    vcpus: u32,
    state: Mutex<State>,
    cv: Condvar,
}

/// What a vCPU thread should do before its next KVM_RUN.
pub enum Gate {
    Run,
    Exit,
}

impl Control {
    pub fn new(vcpus: u32) -> Self {
        Self { vcpus, state: Mutex::new(State::default()), cv: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records why the VM ends; the first reason wins. Wakes everyone.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut st = self.lock();
        if st.exit.is_none() {
            st.exit = Some(reason);
        }
        self.cv.notify_all();
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }

    /// Called by a vCPU thread before each KVM_RUN: blocks while a pause is
    /// requested (acknowledging it once `before_pause` has run, e.g. to save
    /// the vCPU's state), returns `Exit` once the VM is ending.
    pub fn gate(&self, before_pause: &mut dyn FnMut()) -> Gate {
        let mut st = self.lock();
        loop {
            if st.exit.is_some() {
                return Gate::Exit;
            }
            if !st.pause_requested {
                return Gate::Run;
            }
            drop(st);
            before_pause();
            st = self.lock();
            if !st.pause_requested || st.exit.is_some() {
                continue;
            }
            st.paused += 1;
            self.cv.notify_all();
            while st.pause_requested && st.exit.is_none() {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.paused -= 1;
        }
    }

    /// Called by a vCPU thread that has nothing left to run (parked, or its
    /// thread is ending): counts as paused and blocks until the VM ends.
    pub fn park(&self) {
        let mut st = self.lock();
        st.parked += 1;
        self.cv.notify_all();
        while st.exit.is_none() {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Asks every vCPU to stop and waits until all acknowledged. `kick` is
    /// called repeatedly to knock vCPUs out of KVM_RUN (a signal can race with
    /// the entry into the guest, so one kick is not enough).
    pub fn pause(&self, kick: impl Fn()) -> Result<(), ExitReason> {
        self.lock().pause_requested = true;
        loop {
            kick();
            let st = self.lock();
            if let Some(r) = &st.exit {
                return Err(r.clone());
            }
            if st.paused + st.parked >= self.vcpus {
                return Ok(());
            }
            let (st, _) = self.cv.wait_timeout(st, Duration::from_millis(5)).unwrap_or_else(|e| e.into_inner());
            drop(st);
        }
    }

    pub fn resume(&self) {
        self.lock().pause_requested = false;
        self.cv.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().pause_requested
    }

    /// Blocks until the VM ends (or `timeout` passes) and returns the reason.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let mut st = self.lock();
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while st.exit.is_none() {
            match deadline {
                None => st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        break;
                    }
                    st = self.cv.wait_timeout(st, d - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        }
        st.exit.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_every_vcpu_and_exit_wins() {
        let ctl = Arc::new(Control::new(2));
        let mut threads = Vec::new();
        for _ in 0..2 {
            let c = ctl.clone();
            threads.push(std::thread::spawn(move || {
                let mut runs = 0u64;
                while let Gate::Run = c.gate(&mut || {}) {
                    runs += 1;
                    std::thread::sleep(Duration::from_micros(100));
                }
                runs
            }));
        }
        ctl.pause(|| {}).unwrap();
        assert!(ctl.is_paused());
        ctl.resume();
        ctl.request_exit(ExitReason::Shutdown);
        ctl.request_exit(ExitReason::GuestReset);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ctl.exit_reason(), Some(ExitReason::Shutdown));
        assert!(matches!(ctl.pause(|| {}), Err(ExitReason::Shutdown)));
    }

    #[test]
    fn parked_vcpus_count_as_paused() {
        let ctl = Arc::new(Control::new(1));
        let c = ctl.clone();
        let t = std::thread::spawn(move || c.park());
        ctl.pause(|| {}).unwrap();
        ctl.request_exit(ExitReason::Shutdown);
        t.join().unwrap();
    }
}
