//! One thread per vCPU: KVM_RUN, dispatch of every exit, pause/park/exit.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::{Bus, BusAction};
use crate::control::{Control, ExitReason, Gate};
use crate::vstate::VcpuState;

/// Signal used to knock a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for the kick signal; KVM_RUN then returns
/// EINTR when the signal arrives. Idempotent.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), noop_handler).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A running vCPU thread.
pub struct VcpuThread {
    pub index: u32,
    pub handle: JoinHandle<()>,
}

impl VcpuThread {
    pub fn kick(&self) {
        if !self.handle.is_finished() {
            let _ = self.handle.kill(kick_signal());
        }
    }
}

/// The latest saved state of every vCPU, refreshed whenever they pause.
pub type VcpuStates = Arc<std::sync::Mutex<Vec<Option<Result<VcpuState, String>>>>>;

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    pub index: u32,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<Control>,
    /// MSRs to save (from KVM_GET_MSR_INDEX_LIST, readable ones).
    pub msrs: Arc<Vec<u32>>,
    pub states: VcpuStates,
}

/// Saves this vCPU's state into the shared table. Pending I/O is completed
/// first: after an I/O exit, KVM finishes the instruction on the next
/// KVM_RUN, so one KVM_RUN with `immediate_exit` set runs nothing in the
/// guest but leaves the registers consistent.
fn save_state(ctx: &mut VcpuContext) {
    ctx.fd.set_kvm_immediate_exit(1);
    let r = ctx.fd.run().map(|_| ()).or_else(|e| if e.errno() == libc::EINTR { Ok(()) } else { Err(e) });
    ctx.fd.set_kvm_immediate_exit(0);
    let state = match r {
        Ok(()) => VcpuState::capture(ctx.index, &ctx.fd, &ctx.msrs).map_err(|e| e.to_string()),
        Err(e) => Err(format!("completing pending I/O: {e}")),
    };
    if let Err(e) = &state {
        log::error!("vCPU {}: cannot save state: {e}", ctx.index);
    }
    ctx.states.lock().unwrap_or_else(|e| e.into_inner())[ctx.index as usize] = Some(state);
}

pub fn spawn(ctx: VcpuContext) -> std::io::Result<VcpuThread> {
    let index = ctx.index;
    let handle = std::thread::Builder::new().name(format!("vcpu{index}")).spawn(move || run_loop(ctx))?;
    Ok(VcpuThread { index, handle })
}

fn fault(ctx: &VcpuContext, what: String) {
    let rip = ctx
        .fd
        .get_regs()
        .map(|r| format!("{:#x} (RFLAGS {:#x})", r.rip, r.rflags))
        .unwrap_or_else(|_| "unknown".into());
    let cs = ctx.fd.get_sregs().map(|s| format!(", CS {:#x} DPL {}", s.cs.selector, s.cs.dpl)).unwrap_or_default();
    let message = format!("vCPU {}: {what} at RIP {rip}{cs}", ctx.index);
    log::error!("{message}");
    ctx.control.request_exit(ExitReason::Fault { vcpu: ctx.index, message });
}

fn act(ctx: &mut VcpuContext, action: BusAction) -> bool {
    match action {
        BusAction::None => true,
        BusAction::Reset => {
            log::info!("vCPU {}: guest requested a reset (i8042); ending the VM", ctx.index);
            ctx.control.request_exit(ExitReason::GuestReset);
            false
        }
        BusAction::GuestExit(code) => {
            log::info!("vCPU {}: guest exit code {code:#x}", ctx.index);
            ctx.control.request_exit(ExitReason::GuestExit(code));
            false
        }
        BusAction::Park => {
            log::debug!("vCPU {} parked", ctx.index);
            save_state(ctx);
            ctx.control.park();
            false
        }
    }
}

/// Tells KVM the guest was stopped (`KVM_KVMCLOCK_CTRL`): the guest's
/// kvmclock page gets PVCLOCK_GUEST_STOPPED on the next entry and Linux
/// does not take the time it was paused (or saved, or in transit) for a
/// soft lockup. Called before the first run (a restored or incoming vCPU)
/// and after every pause; EINVAL means the guest does not use kvmclock.
fn note_stopped(ctx: &VcpuContext) {
    if let Err(e) = ctx.fd.kvmclock_ctrl() {
        if e.errno() != libc::EINVAL {
            log::debug!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", ctx.index);
        }
    }
}

fn run_loop(mut ctx: VcpuContext) {
    crate::vcpu_cgroup::join(ctx.index);
    let mut stopped = true;
    loop {
        let control = ctx.control.clone();
        if let Gate::Exit = control.gate(&mut || {
            save_state(&mut ctx);
            stopped = true;
        }) {
            return;
        }
        if stopped {
            note_stopped(&ctx);
            stopped = false;
        }
        let keep_going = match ctx.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => match ctx.pio.write(port as u64, data) {
                    Some(a) => act(&mut ctx, a),
                    None => {
                        log::trace!("unclaimed PIO write {port:#x} {data:?}");
                        true
                    }
                },
                VcpuExit::IoIn(port, data) => {
                    if !ctx.pio.read(port as u64, data) {
                        log::trace!("unclaimed PIO read {port:#x}");
                    }
                    true
                }
                VcpuExit::MmioWrite(addr, data) => match ctx.mmio.write(addr, data) {
                    Some(a) => act(&mut ctx, a),
                    None => {
                        log::debug!("unclaimed MMIO write {addr:#x} ({} bytes)", data.len());
                        true
                    }
                },
                VcpuExit::MmioRead(addr, data) => {
                    if !ctx.mmio.read(addr, data) {
                        log::debug!("unclaimed MMIO read {addr:#x} ({} bytes)", data.len());
                    }
                    true
                }
                VcpuExit::Hlt => {
                    fault(&ctx, "guest executed HLT with no interrupt source to wake it (KVM_EXIT_HLT)".into());
                    false
                }
                VcpuExit::Shutdown => {
                    fault(&ctx, "guest triple fault (KVM_EXIT_SHUTDOWN)".into());
                    false
                }
                VcpuExit::InternalError => {
                    // SAFETY: KVM_EXIT_INTERNAL_ERROR fills the `internal`
                    // member of the kvm_run exit union.
                    let sub = unsafe { ctx.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    fault(&ctx, format!("KVM internal error, suberror {sub} (KVM_EXIT_INTERNAL_ERROR)"));
                    false
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    fault(
                        &ctx,
                        format!("VM entry failed on host CPU {cpu}, hardware reason {reason:#x} (KVM_EXIT_FAIL_ENTRY)"),
                    );
                    false
                }
                VcpuExit::SystemEvent(kind, _) => {
                    log::info!("vCPU {}: system event {kind} (shutdown/reset); ending the VM", ctx.index);
                    ctx.control.request_exit(ExitReason::GuestReset);
                    false
                }
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => true,
                other => {
                    let what = format!("unexpected KVM exit {other:?}");
                    fault(&ctx, what);
                    false
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => true,
            Err(e) => {
                fault(&ctx, format!("KVM_RUN failed: {e}"));
                false
            }
        };
        if !keep_going {
            // Parked or ended: count as paused until the VM ends.
            if ctx.control.exit_reason().is_none() {
                ctx.control.park();
            }
            return;
        }
    }
}
