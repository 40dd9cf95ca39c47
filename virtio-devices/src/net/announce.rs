//! The frames a VMM sends for a guest that has just arrived on a new host,
//! so that bridges and switches learn its MAC address on the new port at
//! once (as QEMU's `announce-self`): RARP "request reverse" frames from the
//! guest's MAC, broadcast. They carry no IP address, so no host's ARP cache
//! changes; only the L2 forwarding tables do.

/// Length of an announce frame (the Ethernet minimum without the FCS).
pub const FRAME_LEN: usize = 60;
/// Ethertype of RARP.
pub const ETH_P_RARP: u16 = 0x8035;

/// The RARP announcement of `mac`.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    // ARP header: Ethernet (1), IPv4 (0x0800), hlen 6, plen 4, op 3 (request reverse).
    f[14..16].copy_from_slice(&1u16.to_be_bytes());
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes());
    f[22..28].copy_from_slice(&mac); // sender hardware address
    f[32..38].copy_from_slice(&mac); // target hardware address
    f
}

/// When the host-side announcements go out after the guest starts: five,
/// 50 ms apart, then 100, 150, 200 ms (QEMU's defaults: initial 50 ms,
/// step 50 ms).
pub const SCHEDULE_MS: [u64; 5] = [0, 50, 150, 300, 500];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(u16::from_be_bytes([f[12], f[13]]), ETH_P_RARP);
        assert_eq!(u16::from_be_bytes([f[20], f[21]]), 3);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
    }
}
