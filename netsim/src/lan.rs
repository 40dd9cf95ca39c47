//! The user network of the thesis' Figure 5.8: a client namespace and the
//! host namespaces of a [`crate::NetnsPair`] on one bridged L2 segment,
//! separate from the (shaped) migration link. Each host namespace gets its
//! own bridge `br0` with an uplink to the segment's switch; a VM's TAP is
//! made inside the host namespace and bridged there, so when the VM moves
//! the switch learns the guest's MAC on the other host's uplink.
//!
//! ```text
//!   client ns: cli0 10.0.29.100/24 ──┐
//!                                    switch (bridge in the client ns)
//!   src ns: br0 ── up0 ──────────────┤
//!           └─ TAPs                  │
//!   dst ns: br0 ── up0 ──────────────┘
//!           └─ TAPs
//! ```

use std::io;

use crate::{run, NetnsPair, Side};

/// Client address on the user segment.
pub const CLIENT_IP: &str = "10.0.29.100";
/// Prefix length of the user segment.
pub const PREFIX_LEN: u8 = 24;

/// The user segment; lives as long as the namespaces it was built in.
pub struct UserLan {
    pub client_ns: String,
    taps: Vec<(String, String)>,
}

impl UserLan {
    /// Builds the client namespace (removed on drop) and the switch, and
    /// plugs both hosts of `pair` into it.
    pub fn create(pair: &NetnsPair) -> io::Result<Self> {
        let client_ns = format!("{}-cli", pair.src_ns.trim_end_matches("-src"));
        run(&["ip", "netns", "add", &client_ns])?;
        let lan = Self { client_ns, taps: Vec::new() };
        let c = lan.client_ns.as_str();
        run(&["ip", "-n", c, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", c, "link", "add", "sw0", "type", "bridge"])?;
        run(&["ip", "-n", c, "link", "add", "cli0", "type", "veth", "peer", "name", "swcli"])?;
        run(&["ip", "-n", c, "link", "set", "swcli", "master", "sw0"])?;
        run(&["ip", "-n", c, "addr", "add", &format!("{CLIENT_IP}/{PREFIX_LEN}"), "dev", "cli0"])?;
        for dev in ["sw0", "swcli", "cli0"] {
            run(&["ip", "-n", c, "link", "set", dev, "up"])?;
        }
        for side in [Side::Src, Side::Dst] {
            let ns = pair.ns(side);
            let port = match side {
                Side::Src => "swsrc",
                Side::Dst => "swdst",
            };
            run(&["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])?;
            run(&["ip", "-n", c, "link", "add", port, "type", "veth", "peer", "name", "up0", "netns", ns])?;
            run(&["ip", "-n", c, "link", "set", port, "master", "sw0"])?;
            run(&["ip", "-n", c, "link", "set", port, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "up0", "master", "br0"])?;
            run(&["ip", "-n", ns, "link", "set", "up0", "up"])?;
            run(&["ip", "-n", ns, "link", "set", "br0", "up"])?;
        }
        Ok(lan)
    }

    /// Makes TAP `name` in the namespace of `side` and bridges it there.
    pub fn add_tap(&mut self, pair: &NetnsPair, side: Side, name: &str) -> io::Result<()> {
        let ns = pair.ns(side);
        run(&["ip", "-n", ns, "tuntap", "add", name, "mode", "tap"])?;
        run(&["ip", "-n", ns, "link", "set", name, "master", "br0"])?;
        run(&["ip", "-n", ns, "link", "set", name, "up"])?;
        self.taps.push((ns.to_string(), name.to_string()));
        Ok(())
    }

    /// The switch port (`swsrc`, `swdst`, `swcli`) frames for `mac` go to.
    pub fn switch_port_of(&self, mac: &str) -> Option<String> {
        let out = std::process::Command::new("bridge")
            .args(["-n", &self.client_ns, "fdb", "show", "br", "sw0"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            if v.first() != Some(&mac) {
                return None;
            }
            let i = v.iter().position(|&x| x == "dev")?;
            v.get(i + 1).map(|s| s.to_string())
        })
    }
}

impl Drop for UserLan {
    fn drop(&mut self) {
        for (ns, tap) in &self.taps {
            let _ = run(&["ip", "-n", ns, "link", "del", tap]);
        }
        let _ = run(&["ip", "netns", "del", &self.client_ns]);
    }
}
