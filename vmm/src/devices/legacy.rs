//! Legacy port I/O devices: 8250 UART (vm-superio), i8042 (reset only), the
//! testbed exit port (QEMU `isa-debug-exit` compatible) and park port.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAction, BusDevice};

/// Raises an interrupt line through an irqfd.
pub struct IrqfdTrigger(pub EventFd);

impl Trigger for IrqfdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes. Remembers whether the last byte was
/// a newline, so the VMM can keep its own final line on a line of its own.
pub struct SerialSink {
    out: Box<dyn Write + Send>,
    at_line_start: Arc<AtomicBool>,
}

impl SerialSink {
    pub fn new(out: Box<dyn Write + Send>) -> (Self, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(true));
        (Self { out, at_line_start: flag.clone() }, flag)
    }
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        if n > 0 {
            self.at_line_start.store(buf[n - 1] == b'\n', Ordering::Relaxed);
        }
        // Line-buffer: flush at newlines so logs interleave sensibly.
        if buf[..n].contains(&b'\n') {
            self.out.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// COM1, 8 registers.
pub struct SerialDevice(pub Serial<IrqfdTrigger, vm_superio::serial::NoEvents, SerialSink>);

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 && offset < 8 {
            data[0] = self.0.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.0.write(offset as u8, data[0]) {
                log::warn!("serial: write failed: {e:?}");
            }
        }
        BusAction::None
    }
}

/// A trigger that just records that it fired.
#[derive(Default)]
pub struct FlagTrigger(AtomicBool);

impl Trigger for FlagTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// i8042 keyboard controller at 0x60..0x65; only its CPU reset line matters.
pub struct I8042(pub I8042Device<FlagTrigger>);

impl Default for I8042 {
    fn default() -> Self {
        Self(I8042Device::new(FlagTrigger::default()))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 {
            data[0] = self.0.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if data.len() == 1 && self.0.write(offset as u8, data[0]).is_ok() && self.0.reset_evt().0.load(Ordering::SeqCst)
        {
            return BusAction::Reset;
        }
        BusAction::None
    }
}

/// The testbed exit port: a write of any width ends the VM with that value.
pub struct ExitPort;

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        BusAction::GuestExit(u32::from_le_bytes(v))
    }
}

/// The testbed park port: the writing vCPU stops running.
pub struct ParkPort;

impl BusDevice for ParkPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> BusAction {
        BusAction::Park
    }
}

/// The testbed session port ([`testbed_abi::SESSION_PORT`]): reads return
/// the session specification byte by byte (0 past its end, or while there is
/// none); a write starts it over.
pub struct SessionPort {
    pub spec: Arc<Mutex<Vec<u8>>>,
    pos: usize,
}

impl SessionPort {
    pub fn new(spec: Arc<Mutex<Vec<u8>>>) -> Self {
        Self { spec, pos: 0 }
    }
}

impl BusDevice for SessionPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let spec = self.spec.lock().unwrap_or_else(|e| e.into_inner());
        for b in data.iter_mut() {
            *b = spec.get(self.pos).copied().unwrap_or(0);
            self.pos = (self.pos + 1).min(spec.len());
        }
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> BusAction {
        self.pos = 0;
        BusAction::None
    }
}

/// Shared handle type for bus devices.
pub fn shared<D: BusDevice + 'static>(d: D) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_port_reads_the_spec_and_rewinds() {
        let spec = Arc::new(Mutex::new(Vec::new()));
        let mut port = SessionPort::new(spec.clone());
        let mut b = [9u8];
        port.read(0, &mut b);
        assert_eq!(b, [0], "no session yet");
        *spec.lock().unwrap() = b"app,seed=2".to_vec();
        port.write(0, &[0]);
        let mut got = Vec::new();
        loop {
            port.read(0, &mut b);
            if b[0] == 0 {
                break;
            }
            got.push(b[0]);
        }
        assert_eq!(got, b"app,seed=2");
        port.write(0, &[0]);
        port.read(0, &mut b);
        assert_eq!(b, [b'a']);
    }

    #[test]
    fn i8042_reset_requests_vm_reset() {
        let mut dev = I8042::default();
        assert_eq!(dev.write(4, &[0x20]), BusAction::None);
        assert_eq!(dev.write(4, &[0xfe]), BusAction::Reset);
    }

    #[test]
    fn exit_port_reports_code() {
        assert_eq!(ExitPort.write(0, &0x10u32.to_le_bytes()), BusAction::GuestExit(0x10));
        assert_eq!(ExitPort.write(0, &[0x11]), BusAction::GuestExit(0x11));
    }

    #[test]
    fn serial_output_reaches_sink() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (sink, at_start) = SerialSink::new(Box::new(Shared(buf.clone())));
        let irq = IrqfdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut dev = SerialDevice(Serial::new(irq, sink));
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert!(!at_start.load(Ordering::Relaxed));
        dev.write(0, b"\n");
        assert!(at_start.load(Ordering::Relaxed));
        assert_eq!(&*buf.lock().unwrap(), b"hi\n");
    }
}
