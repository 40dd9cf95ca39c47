//! A VM's network device across snapshots and migrations (testbed guests
//! on /dev/kvm, real TAPs): the MAC is part of the VM and stays; the TAP is
//! the host's, named by the restoring or receiving VMM; the new host
//! announces the guest's MAC on its TAP (RARP) right after the switch-over.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    api, migrate_mode, path_str, snapshot, spawn_piped, vmm, vmm_bin, wait_for_run_phase, wait_output, TempDir,
};
use netsim::l2::{PacketSocket, TestTap};

const T: Duration = Duration::from_secs(120);
const MAC: &str = "02:00:0a:0b:0c:0d";
const MAC_BYTES: [u8; 6] = [0x02, 0x00, 0x0a, 0x0b, 0x0c, 0x0d];
const ETH_P_RARP: u16 = 0x8035;

fn vmm_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(vmm_bin());
    c.args(args);
    c
}

/// The RARP announcements of MAC on `rarp` (at least `n` of them).
fn expect_announcements(rarp: &PacketSocket, n: usize) {
    let mut seen = 0;
    while seen < n {
        let f = rarp.recv().unwrap_or_else(|| panic!("only {seen} of {n} announcements arrived"));
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &MAC_BYTES, "from the guest's MAC");
        assert_eq!(u16::from_be_bytes([f[12], f[13]]), ETH_P_RARP);
        assert_eq!(&f[22..28], &MAC_BYTES);
        seen += 1;
    }
}

fn net_status(sock: &std::path::Path) -> serde_json::Value {
    api(sock, "status")["net"][0].clone()
}

#[test]
fn the_mac_stays_and_the_new_host_announces_it() {
    let (a, b, c) = (TestTap::new("A").unwrap(), TestTap::new("B").unwrap(), TestTap::new("C").unwrap());
    let d = TempDir::new("net");
    let (sock_a, sock_b, sock_c) = (d.path("a.sock"), d.path("b.sock"), d.path("c.sock"));
    let snap = d.path("vm.snap");
    let key = d.path("key");
    std::fs::write(&key, b"0123456789abcdef-test-migration-key").unwrap();

    // Bad --net options are refused before anything runs.
    for (bad, why) in [("tap=x,mac=03:00:00:00:00:01", "multicast"), ("mac=02:00:00:00:00:01", "no tap="), ("tap=", "")]
    {
        let o = vmm(&["run", "--testbed", "kv,duration=1", "--net", bad], T);
        assert_ne!(o.code, Some(0), "{bad} accepted: {o}");
        assert!(o.stderr.contains(why), "{bad}: {o}");
    }

    let net = format!("tap={},mac={MAC}", a.name);
    let src = spawn_piped(vmm_cmd(&[
        "run",
        "--testbed",
        "kv,duration=0,share=10",
        "--mem",
        "128M",
        "--net",
        &net,
        "--api-sock",
        path_str(&sock_a),
    ]));
    wait_for_run_phase(&sock_a);
    let st = net_status(&sock_a);
    assert_eq!(st["mac"], MAC, "{st}");
    assert_eq!(st["tap"], a.name.as_str(), "{st}");

    // Snapshot, stop, restore on another TAP: the same MAC, announced there.
    snapshot(&sock_a, &snap);
    api(&sock_a, "shutdown");
    assert_eq!(wait_output(src, T).code, Some(0));
    let o =
        vmm(&["restore", "--snapshot", path_str(&snap), "--net", &format!("tap={},mac=02:00:00:00:00:01", b.name)], T);
    assert_ne!(o.code, Some(0), "{o}");
    assert!(o.stderr.contains("cannot become"), "a restored NIC cannot change its MAC: {o}");

    let rarp_b = PacketSocket::bind(&b.name, ETH_P_RARP, Duration::from_secs(5)).unwrap();
    let restored = spawn_piped(vmm_cmd(&[
        "restore",
        "--snapshot",
        path_str(&snap),
        "--net",
        &format!("tap={}", b.name),
        "--api-sock",
        path_str(&sock_b),
    ]));
    wait_for_run_phase(&sock_b);
    expect_announcements(&rarp_b, 5);
    let st = net_status(&sock_b);
    assert_eq!((st["mac"].as_str(), st["tap"].as_str()), (Some(MAC), Some(b.name.as_str())), "{st}");

    // Migrate (post-copy) to a destination on a third TAP: announced there
    // right after the switch-over, and the source's TAP hears nothing more.
    let rarp_c = PacketSocket::bind(&c.name, ETH_P_RARP, Duration::from_secs(5)).unwrap();
    let to = "127.0.0.1:7391";
    let dst = spawn_piped(vmm_cmd(&[
        "receive",
        "--listen",
        to,
        "--key-file",
        path_str(&key),
        "--net",
        &format!("tap={}", c.name),
        "--api-sock",
        path_str(&sock_c),
    ]));
    std::thread::sleep(Duration::from_millis(300));
    let (ok, report, err) = migrate_mode(&sock_b, to, &key, "postcopy");
    assert!(ok, "{report} {err}");
    assert_eq!(report["integrity"]["match"], true, "{report}");
    expect_announcements(&rarp_c, 5);
    assert_eq!(wait_output(restored, T).code, Some(0));
    let st = net_status(&sock_c);
    assert_eq!((st["mac"].as_str(), st["tap"].as_str()), (Some(MAC), Some(c.name.as_str())), "{st}");
    assert!(api(&sock_c, "status")["workload"]["ops"].as_u64().unwrap_or(0) > 0);
    api(&sock_c, "shutdown");
    let o = wait_output(dst, T);
    assert_eq!(o.code, Some(0), "{o}");
}
