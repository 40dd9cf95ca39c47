//! Layer 2 for tests: TAP interfaces made with iproute2 and raw packet
//! sockets (`AF_PACKET`) on them: the wire a virtio-net device's frames
//! cross. Needs root.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

/// A persistent TAP interface (`ip tuntap add NAME mode tap`), up, without
/// IPv6 (so the kernel sends no frames of its own into it); deleted on drop.
pub struct TestTap {
    pub name: String,
}

impl TestTap {
    /// `vnt<pid><tag>` (at most 15 bytes: keep `tag` short).
    pub fn new(tag: &str) -> std::io::Result<Self> {
        let name = format!("vnt{}{tag}", std::process::id() % 100_000);
        Self::named(&name)
    }

    pub fn named(name: &str) -> std::io::Result<Self> {
        let _ = Command::new("ip").args(["link", "del", name]).stderr(Stdio::null()).status();
        ip(&["tuntap", "add", name, "mode", "tap"])?;
        let t = Self { name: name.to_string() };
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        ip(&["link", "set", name, "up"])?;
        Ok(t)
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

fn ip(args: &[&str]) -> std::io::Result<()> {
    let st = Command::new("ip").args(args).status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("ip {}: {st}", args.join(" "))))
    }
}

/// A raw packet socket bound to one interface and one ethertype.
pub struct PacketSocket(OwnedFd);

impl PacketSocket {
    /// Frames of `ethertype` on `ifname`; `recv` waits at most `timeout`.
    pub fn bind(ifname: &str, ethertype: u16, timeout: std::time::Duration) -> std::io::Result<Self> {
        let proto = ethertype.to_be() as libc::c_int;
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a new socket this function owns from here on.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(ifname).map_err(std::io::Error::other)?;
        // SAFETY: a NUL-terminated name that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(std::io::Error::other(format!("no interface {ifname}")));
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = ethertype.to_be();
        sa.sll_ifindex = ifindex as i32;
        // SAFETY: sa is a sockaddr_ll of the length given.
        let rc = unsafe {
            libc::bind(fd, &sa as *const libc::sockaddr_ll as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: timeout.subsec_micros() as _ };
        // SAFETY: SO_RCVTIMEO reads a timeval of the length given.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of_val(&tv) as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(owned))
    }

    /// Sends one frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr() as *const libc::c_void, frame.len(), 0) };
        if n != frame.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame the interface carried towards the host (frames this
    /// host sent are skipped), or None after the timeout.
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: sockaddr_ll is plain data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of_val(&from) as u32;
            // SAFETY: buf and from are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                return None;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Some(buf[..n as usize].to_vec());
        }
    }
}

/// A Linux bridge with an address (the hosts' side of a VM's L2 segment);
/// deleted on drop (its ports stay).
pub struct TestBridge {
    pub name: String,
}

impl TestBridge {
    /// `vnb<pid><tag>` with `cidr` (e.g. 10.0.9.1/24) on it, up.
    pub fn new(tag: &str, cidr: &str) -> std::io::Result<Self> {
        let name = format!("vnb{}{tag}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["link", "del", &name]).stderr(Stdio::null()).status();
        ip(&["link", "add", &name, "type", "bridge"])?;
        let b = Self { name };
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", b.name), "1");
        ip(&["addr", "add", cidr, "dev", &b.name])?;
        ip(&["link", "set", &b.name, "up"])?;
        Ok(b)
    }

    /// Makes `tap` a port of the bridge.
    pub fn attach(&self, tap: &TestTap) -> std::io::Result<()> {
        ip(&["link", "set", &tap.name, "master", &self.name])
    }

    /// The port the bridge forwards frames for `mac` (`aa:bb:...`) to, per
    /// its forwarding database.
    pub fn port_of(&self, mac: &str) -> Option<String> {
        let out = Command::new("bridge").args(["fdb", "show", "br", &self.name]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(mac)).then(|| {
                let v: Vec<&str> = l.split_whitespace().collect();
                v.iter().position(|&x| x == "dev").and_then(|i| v.get(i + 1)).map(|s| s.to_string())
            })?
        })
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).stderr(Stdio::null()).status();
    }
}
