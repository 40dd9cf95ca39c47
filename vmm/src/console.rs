//! Console input: the VMM's stdin to the guest's 8250 serial port, so an
//! operator can log in to a Linux guest (and a test can type into it).
//!
//! Bytes go into the UART's receive FIFO (`enqueue_raw_bytes`, which raises
//! the receive interrupt); when the FIFO is full the reader waits for the
//! guest to drain it, so nothing typed is lost. When stdin is a terminal it
//! is put in raw mode (no local echo or line editing: the guest echoes, and
//! Ctrl-C goes to the guest) and restored when the console is dropped; the
//! sequence Ctrl-A x ends the VMM, as in QEMU. At end of input (stdin is
//! /dev/null, a closed pipe) the reader stops; the guest keeps running.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::terminal::Terminal;

use crate::control::{Control, ExitReason};
use crate::devices::legacy::SerialDevice;

/// Ctrl-A, the escape byte; followed by `x` it ends the VMM.
const ESCAPE: u8 = 0x01;

/// The running console; restores the terminal when dropped.
pub struct Console {
    raw: bool,
}

impl Console {
    /// Starts forwarding stdin to `serial` on a thread of its own.
    pub fn start(serial: Arc<Mutex<SerialDevice>>, control: Arc<Control>) -> std::io::Result<Self> {
        let stdin = std::io::stdin();
        let raw = std::io::IsTerminal::is_terminal(&stdin) && stdin.lock().set_raw_mode().is_ok();
        if raw {
            log::info!("console: this terminal is the guest's serial console (Ctrl-A x ends the VMM)");
        }
        std::thread::Builder::new().name("console-in".into()).spawn(move || forward(serial, control, raw))?;
        Ok(Self { raw })
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if self.raw {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

/// Splits input at the escape sequence: what to send to the guest, and
/// whether the operator asked to quit. `pending` carries an escape byte
/// across reads.
fn filter(input: &[u8], pending: &mut bool) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(input.len());
    for &b in input {
        if *pending {
            *pending = false;
            match b {
                b'x' | b'X' => return (out, true),
                ESCAPE => out.push(ESCAPE), // Ctrl-A Ctrl-A: a literal Ctrl-A
                other => {
                    out.push(ESCAPE);
                    out.push(other);
                }
            }
        } else if b == ESCAPE {
            *pending = true;
        } else {
            out.push(b);
        }
    }
    (out, false)
}

fn forward(serial: Arc<Mutex<SerialDevice>>, control: Arc<Control>, escapes: bool) {
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 256];
    let mut pending = false;
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("console: reading stdin: {e}");
                return;
            }
        };
        let (bytes, quit) = if escapes { filter(&buf[..n], &mut pending) } else { (buf[..n].to_vec(), false) };
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            if control.exit_reason().is_some() {
                return;
            }
            let taken = serial.lock().unwrap_or_else(|e| e.into_inner()).0.enqueue_raw_bytes(rest);
            match taken {
                Ok(k) => rest = &rest[k..],
                Err(vm_superio::serial::Error::FullFifo) => {}
                Err(e) => {
                    log::debug!("console: the guest's UART refused input: {e:?}");
                    return;
                }
            }
            if !rest.is_empty() {
                // The receive FIFO is full (or the UART is in loopback
                // mode): let the guest drain it.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if quit {
            log::info!("console: Ctrl-A x: ending the VMM");
            control.request_exit(ExitReason::Shutdown);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut p = false;
        assert_eq!(filter(b"ls\n", &mut p), (b"ls\n".to_vec(), false));
        assert_eq!(filter(b"ab\x01x cd", &mut p), (b"ab".to_vec(), true));
        assert_eq!(filter(b"\x01\x01", &mut p), (vec![ESCAPE], false));
        // An escape at the end of one read applies to the next.
        assert_eq!(filter(b"a\x01", &mut p), (b"a".to_vec(), false));
        assert!(p);
        assert_eq!(filter(b"x", &mut p), (vec![], true));
        let mut p = false;
        assert_eq!(filter(b"\x01c", &mut p), (vec![ESCAPE, b'c'], false));
    }
}
