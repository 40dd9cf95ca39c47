//! A Linux TAP interface opened with a virtio-net header (`IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR`), non-blocking: every frame read or written
//! carries the 12-byte `struct virtio_net_hdr_v1` in front, so a VERSION_1
//! driver's buffers pass through unchanged. No offloads are enabled
//! (`TUNSETOFFLOAD` 0): the kernel hands us complete, checksummed frames.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Length of the virtio-net header in front of every frame (VERSION_1:
/// `struct virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
// _IOW('T', 202, int), _IOW('T', 208, unsigned int), _IOW('T', 216, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags (the rest of
/// the union is padding here).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP interface `name` (creating it, down, if it does
    /// not exist: normally the operator made it with `ip tuntap add NAME
    /// mode tap` and set it up or put it on a bridge).
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0 || b == b'/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{name}` is not an interface name (1-15 bytes, no NUL or '/')"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let fd = file.as_raw_fd();
        // SAFETY: TUNSETIFF reads (and writes back) a `struct ifreq`; `req`
        // is one, laid out as the kernel expects, and outlives the call.
        let rc = unsafe { libc::ioctl(fd, TUNSETIFF as _, &mut req as *mut IfReq) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
        }
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which
        // points at a live c_int.
        let rc = unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ as _, &hdr_len as *const libc::c_int) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETVNETHDRSZ {name}: {e}")));
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value (no pointer).
        let rc = unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, 0 as libc::c_ulong) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETOFFLOAD {name}: {e}")));
        }
        let end = req.name.iter().position(|&b| b == 0).unwrap_or(libc::IFNAMSIZ);
        Ok(Self { file, name: String::from_utf8_lossy(&req.name[..end]).into_owned() })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its header) into `buf`; `WouldBlock` if none
    /// is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (with its header).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
