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
    common::write_key(&key, b"0123456789abcdef-test-migration-key");

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

thread_local! {
    static DEBUG_SOCK: std::cell::RefCell<Option<std::path::PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// One request on an open memcached connection; the reply up to `END` or
/// a one-line answer.
fn mc(conn: &mut std::net::TcpStream, req: &str) -> String {
    use std::io::{Read, Write};
    conn.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                let st = DEBUG_SOCK.with(|p| p.borrow().as_ref().map(|p| api(p, "status")));
                panic!("reading the answer to {req:?}: {e}; the VM now: {st:?}")
            }
        };
        assert!(n > 0, "the server closed the connection (answer so far {:?})", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
        let s = String::from_utf8_lossy(&out);
        if s.ends_with("END\r\n") || (!req.starts_with("get") && s.ends_with("\r\n")) {
            return s.into_owned();
        }
    }
}

#[test]
fn a_tcp_connection_to_the_guest_survives_every_migration_mode() {
    let br = netsim::l2::TestBridge::new("m", "10.0.9.1/24").unwrap();
    let taps = [TestTap::new("P").unwrap(), TestTap::new("Q").unwrap()];
    for t in &taps {
        br.attach(t).unwrap();
    }
    let d = TempDir::new("netmig");
    let key = d.path("key");
    common::write_key(&key, b"0123456789abcdef-test-migration-key");
    let sock = |i: usize| d.path(&format!("vm{i}.sock"));
    let net = format!("tap={},mac={MAC}", taps[0].name);
    let mut vm = spawn_piped(vmm_cmd(&[
        "run",
        "--testbed",
        "mcd,ip=10.0.9.15/24,share=10",
        "--mem",
        "256M",
        "--net",
        &net,
        "--api-sock",
        path_str(&sock(0)),
    ]));
    // The server's run phase (it counts no operations until served).
    let started = std::time::Instant::now();
    while !sock(0).exists()
        || Command::new(vmm_bin())
            .args(["api", "--api-sock", path_str(&sock(0)), "status"])
            .output()
            .map(|o| !String::from_utf8_lossy(&o.stdout).contains("\"phase\":\"run\""))
            .unwrap_or(true)
    {
        assert!(started.elapsed() < T, "the mcd server never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut conn = {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match std::net::TcpStream::connect_timeout(&"10.0.9.15:11211".parse().unwrap(), Duration::from_secs(2)) {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("connect: {e}; again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("no TCP connection to the testbed's memcached: {e}"),
            }
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(mc(&mut conn, "set k0 7 0 6\r\nbefore\r\n"), "STORED\r\n");
    assert_eq!(br.port_of(MAC).as_deref(), Some(taps[0].name.as_str()));

    for (i, mode) in ["stop-and-copy", "precopy", "postcopy", "enlightened"].iter().enumerate() {
        let to = format!("127.0.0.1:{}", 7400 + i);
        let tap = &taps[(i + 1) % 2];
        let dst = spawn_piped(vmm_cmd(&[
            "receive",
            "--listen",
            &to,
            "--key-file",
            path_str(&key),
            "--net",
            &format!("tap={}", tap.name),
            "--api-sock",
            path_str(&sock(i + 1)),
        ]));
        std::thread::sleep(Duration::from_millis(300));
        let (ok, report, err) = migrate_mode(&sock(i), &to, &key, mode);
        assert!(ok, "{mode}: {report} {err}");
        assert_eq!(report["integrity"]["match"], true, "{mode}: {report}");
        let o = wait_output(vm, T);
        assert_eq!(o.code, Some(0), "{mode}: the source: {o}");
        vm = dst;
        // The announcement moved the guest's MAC to the destination's TAP.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while br.port_of(MAC).as_deref() != Some(tap.name.as_str()) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(br.port_of(MAC).as_deref(), Some(tap.name.as_str()), "{mode}: the bridge's FDB");
        DEBUG_SOCK.with(|p| *p.borrow_mut() = Some(sock(i + 1)));
        // The same connection: everything stored so far, then one more.
        for j in 0..=i {
            let want = if j == 0 {
                "VALUE k0 7 6\r\nbefore\r\nEND\r\n".to_string()
            } else {
                format!("VALUE k{j} 0 1\r\n{j}\r\nEND\r\n")
            };
            assert_eq!(mc(&mut conn, &format!("get k{j}\r\n")), want, "{mode}");
        }
        assert_eq!(mc(&mut conn, &format!("set k{} 0 0 1\r\n{}\r\n", i + 1, i + 1)), "STORED\r\n", "{mode}");
        let st = api(&sock(i + 1), "status");
        assert_eq!(st["workload"]["errors"], 0, "{mode}: {st}");
    }
    drop(conn);
    api(&sock(4), "shutdown");
    let o = wait_output(vm, T);
    assert_eq!(o.code, Some(0), "{o}");
}
