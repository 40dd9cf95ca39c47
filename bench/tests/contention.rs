//! The contention experiment end to end, shortened: two `mcd` VMs on the
//! source host's CPU budget, memslap clients in the client namespace over
//! the bridged user network, one VM migrated with --enlightened. memslap
//! must finish cleanly with no connection error on either VM, the switch
//! must forward the migrated guest's MAC to the destination host, and
//! memslap must see the migrated VM serve after the switch-over; the packet
//! tap must see both VMs answer at 100 ms resolution, and the destination
//! must place guest RAM as huge pages from its prepared pool.

use bench::contention::{plot, run, Scenario};

#[test]
fn memslap_keeps_both_vms_served_through_an_enlightened_migration() {
    if std::process::Command::new("memcaslap").arg("--version").output().is_err() {
        panic!("memcaslap is missing: scripts/setup installs Debian's libmemcached-tools");
    }
    // target/debug/deps/contention-* -> target/debug/vmm
    let exe = std::env::current_exe().unwrap();
    let vmm = exe.parent().unwrap().parent().unwrap().join("vmm");
    assert!(vmm.exists(), "{} (build the workspace first)", vmm.display());
    let dir = std::env::temp_dir().join(format!("contention-test-{}", std::process::id()));
    let sc = Scenario {
        mode: "enlightened".into(),
        rate_bps: 1_000_000_000,
        mem: "256M".into(),
        host_cpus: 0.5,
        concurrency: 8,
        value: 1024,
        store_pct: 40,
        fill_pct: 25,
        alone_s: 2,
        contended_s: 2,
        after_s: 3,
    };
    let r = run(&vmm, &sc, 7690, &dir).expect("the scenario runs");
    let s = &r["summary"];
    assert_eq!(s["integrity"], true, "{s}");
    assert_eq!(s["memslap_clean_exit"]["migrated"], true, "{s}");
    assert_eq!(s["memslap_clean_exit"]["contending"], true, "{s}");
    assert_eq!(s["memslap_connection_errors"], 0, "{s}");
    assert_eq!(s["switch_port_after"], "swdst", "the switch learnt the new host's port: {s}");
    assert_eq!(s["dest_workload_errors"], 0, "{s}");
    let served_after = r["migrated"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["t_ms"].as_i64().unwrap() > 1000 && p["ops_per_sec"].as_f64().unwrap() > 0.0)
        .count();
    assert!(served_after >= 1, "memslap saw the migrated VM serve after the switch-over: {r}");
    assert!(s["uncontended_ops_per_sec"].as_f64().unwrap() > 0.0, "{s}");
    // The packet tap paired requests with answers for both VMs, before and
    // after the switch-over, at 100 ms.
    let served_100ms = |k: &str, after: bool| {
        r[k].as_array()
            .unwrap()
            .iter()
            .filter(|b| (b["t_ms"].as_i64().unwrap() > 1000) == after && b["ops_per_sec"].as_f64().unwrap() > 0.0)
            .count()
    };
    for k in ["migrated_100ms", "contending_100ms"] {
        assert!(served_100ms(k, false) >= 5 && served_100ms(k, true) >= 5, "{k}: {}", r[k]);
    }
    assert!(s["tap_100ms"]["uncontended_ops_per_sec"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["tap_100ms"]["migrated_p99_during_ms"].as_f64().unwrap() > 0.0, "{s}");
    // Guest RAM went in as whole huge pages from the prepared pool.
    let d = &r["report"]["destination"];
    assert!(d["huge_blocks_placed"].as_u64().unwrap() > 0, "{d}");
    assert!(d["blocks_from_prepared_pool"].as_u64().unwrap() > 0, "{d}");
    let svg = plot(&r, "test").unwrap();
    assert!(svg.contains("<svg") && svg.contains("migrated VM"), "plotters drew the timeline");
    let _ = std::fs::remove_dir_all(&dir);
}
