//! `enlighten-vhost --socket PATH --control PATH`: serves the enlightenment
//! device to QEMU over vhost-user and a control API on a Unix socket (see
//! the library documentation).

use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use enlighten_vhost::{Control, EnlightenBackend, DELIVER_EVENT};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

#[derive(Parser)]
#[command(about = "vhost-user backend of the enlightenment device (virtio ID 63) with a control socket")]
struct Args {
    /// vhost-user socket QEMU connects to (created; QEMU's chardev is a client).
    #[arg(long)]
    socket: String,
    /// Control socket: line commands prepare [window_ms], wait [timeout_ms],
    /// maps [DIR], done, abort, raw HEX, status; JSON replies.
    #[arg(long)]
    control: String,
    /// Timeout of wait/done/abort in milliseconds.
    #[arg(long, default_value_t = 300_000)]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let _ = std::fs::remove_file(&args.control);
    let listener = match UnixListener::bind(&args.control) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("enlighten-vhost: binding control socket {}: {e}", args.control);
            return ExitCode::FAILURE;
        }
    };
    let backend = EnlightenBackend::new();
    let control = Control::new(backend.clone(), Duration::from_millis(args.timeout_ms));
    let mut daemon = match VhostUserDaemon::new(
        "enlighten-vhost".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    ) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("enlighten-vhost: creating the daemon: {e}");
            return ExitCode::FAILURE;
        }
    };
    for h in daemon.get_epoll_handlers() {
        if let Err(e) = h.register_listener(backend.deliver_fd(), EventSet::IN, u64::from(DELIVER_EVENT)) {
            eprintln!("enlighten-vhost: registering the delivery event: {e}");
            return ExitCode::FAILURE;
        }
    }
    std::thread::spawn(move || control.serve(listener));
    let _ = std::fs::remove_file(&args.socket);
    log::info!("enlighten-vhost: serving {} (control {})", args.socket, args.control);
    let code = match daemon.serve(&args.socket) {
        Ok(()) => {
            log::info!("enlighten-vhost: front-end disconnected");
            0
        }
        Err(e) => {
            eprintln!("enlighten-vhost: {e}");
            1
        }
    };
    // Exit without dropping the daemon: its vring worker threads wait for an
    // exit event that a finished connection no longer sends, so the drop
    // would hang. There is nothing to flush.
    std::process::exit(code)
}
