// SPDX-License-Identifier: GPL-2.0-only

//! `enlighten`: the project's guest kernel module (skeleton).
//!
//! For now it only proves the toolchain and the shared ABI: it includes the
//! wire format source that the host crate `bitmap-abi` also compiles
//! (`bitmap-abi/src/wire.rs`), runs an encode/decode round trip of it inside
//! the kernel, prints the ABI version and virtio device ID it was built with,
//! and unloads cleanly. The virtio driver, the free bitmap and the priority
//! map come later (see README.md).

use kernel::prelude::*;

/// The guest/host wire format, shared verbatim with the host (`bitmap-abi`).
///
/// The kernel's Rust flags warn about two things in it, both expected for a
/// shared file: `unreachable_pub` (its items are `pub` for the host crate but
/// the module is private here) and `dead_code` (the skeleton uses little).
#[allow(dead_code, unreachable_pub)]
#[path = "../../bitmap-abi/src/wire.rs"]
mod wire;

module! {
    type: Enlighten,
    name: "enlighten",
    author: "vmm project",
    description: "Enlightened post-copy: free and priority bitmaps for the host (skeleton)",
    license: "GPL",
}

struct Enlighten;

/// Encodes a Prepare command with the shared wire code and decodes it back,
/// so that the shared source is not only compiled but also run in the kernel.
fn wire_self_test() -> Result {
    let mut buf = [0u8; wire::Prepare::LEN];
    let sent = wire::Prepare {
        seq: 1,
        active_window_ms: wire::DEFAULT_ACTIVE_WINDOW_MS,
    };
    let len = sent.encode(&mut buf).map_err(|_| EINVAL)?;
    match wire::Command::decode(&buf[..len]) {
        Ok(wire::Command::Prepare(got)) if got == sent => Ok(()),
        _ => Err(EINVAL),
    }
}

impl kernel::Module for Enlighten {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        if let Err(e) = wire_self_test() {
            pr_err!("wire format self-test failed\n");
            return Err(e);
        }
        pr_info!(
            "loaded, ABI version {}, device id {}\n",
            wire::VERSION,
            wire::DEVICE_ID
        );
        Ok(Enlighten)
    }
}

impl Drop for Enlighten {
    fn drop(&mut self) {
        pr_info!("unloaded\n");
    }
}
