//! The whole engine, both ends, in one process and without KVM: a fake VM
//! (vm-memory mappings, a "vCPU" thread writing to them until paused, an
//! opaque state, enlightenment maps built here) migrates through
//! [`migrate::source::migrate`] to [`migrate::receive::accept`] over
//! loopback TCP in each of the four modes. The destination's memory is
//! compared page by page with the source's at suspension; post-copy's
//! destination is registered with userfaultfd and read by a thread while
//! the push runs (its faults are served on the demand connection).

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitmap_abi::wire::{free_bitmap_len, priority_map_len, set_class, set_free_bit};
use bitmap_abi::Class;
use migrate::policy::GuestMaps;
use migrate::progress::{Mode, Progress};
use migrate::space::{GuestMem, PAGE_SIZE};
use migrate::transport::Credentials;
use migrate::vm::{IncomingVm, MigratableVm};
use migrate::wire::Key;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MIB: u64 = 1 << 20;
/// Two RAM regions with a hole between them, as on x86 below 4 GiB.
const REGIONS: [(u64, u64); 2] = [(0, 6 * MIB), (8 * MIB, 4 * MIB)];
/// Free frames (enlightened): inside both regions.
const FREE: [(u64, u64); 2] = [(256, 512), (2200, 300)];
const STATE: &[u8] = b"vcpu and device state, opaque to the engine";

fn memory(regions: &[(u64, u64)]) -> GuestMem {
    let r: Vec<(GuestAddress, usize)> = regions.iter().map(|&(a, l)| (GuestAddress(a), l as usize)).collect();
    GuestMem::from_ranges(&r).expect("guest memory")
}

fn is_free(pfn: u64) -> bool {
    FREE.iter().any(|&(a, n)| pfn >= a && pfn < a + n)
}

/// The fake VM: memory with a pattern, every fourth page zero, and a vCPU
/// that keeps writing until paused.
struct FakeVm {
    mem: Arc<GuestMem>,
    status: Progress,
    paused: Arc<Mutex<bool>>,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    released: AtomicU64,
    migrated: AtomicBool,
    /// Runs at the commit, before the destination is told (a test cuts the link there).
    on_commit: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl FakeVm {
    fn new() -> Self {
        let mem = Arc::new(memory(&REGIONS));
        for &(base, len) in &REGIONS {
            for gpa in (base..base + len).step_by(PAGE_SIZE as usize) {
                if (gpa / PAGE_SIZE) % 4 != 0 {
                    mem.write_obj(gpa ^ 0x5a5a_5a5a, GuestAddress(gpa)).unwrap();
                }
            }
        }
        let vm = FakeVm {
            mem,
            status: Progress::default(),
            paused: Arc::new(Mutex::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            writes: Arc::new(AtomicU64::new(0)),
            released: AtomicU64::new(0),
            migrated: AtomicBool::new(false),
            on_commit: Mutex::new(None),
        };
        vm.start_vcpu();
        vm
    }

    /// Writes a counter into a spread of non-free pages while running.
    fn start_vcpu(&self) {
        let (mem, paused, stop, writes) =
            (self.mem.clone(), self.paused.clone(), self.stop.clone(), self.writes.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                {
                    let p = paused.lock().unwrap();
                    if !*p {
                        for k in 0..16u64 {
                            let pfn = (n * 97 + k * 13) % (6 * MIB / PAGE_SIZE);
                            if !is_free(pfn) && pfn % 4 != 0 {
                                mem.write_obj(n, GuestAddress(pfn * PAGE_SIZE + 8)).unwrap();
                            }
                        }
                        n += 1;
                        writes.store(n, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl MigratableVm for FakeVm {
    fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }
    fn config(&self) -> migrate::Result<Vec<u8>> {
        Ok(json!({ "regions": REGIONS }).to_string().into_bytes())
    }
    fn status(&self) -> &Progress {
        &self.status
    }
    fn pause(&self) -> migrate::Result<bool> {
        let mut p = self.paused.lock().unwrap();
        Ok(!std::mem::replace(&mut *p, true))
    }
    fn resume(&self) {
        *self.paused.lock().unwrap() = false;
    }
    fn ended(&self) -> Option<String> {
        None
    }
    fn set_dirty_log(&self, _on: bool) -> migrate::Result<()> {
        Ok(()) // vm-memory's bitmap logs every write through `Bytes`
    }
    fn take_dirty(&self) -> migrate::Result<Vec<Vec<u64>>> {
        Ok(self.mem.iter().map(|r| std::ops::Deref::deref(r).bitmap().get_and_reset()).collect())
    }
    fn sync_disks(&self) -> migrate::Result<()> {
        Ok(())
    }
    fn write_state(&self) -> migrate::Result<Vec<u8>> {
        assert!(*self.paused.lock().unwrap(), "state is written while paused");
        Ok(STATE.to_vec())
    }
    fn enlighten_prepare(&self) -> migrate::Result<GuestMaps> {
        let frames = (8 * MIB + 4 * MIB) / PAGE_SIZE;
        let mut prio = vec![0u8; priority_map_len(frames) as usize];
        let mut free = vec![0u8; free_bitmap_len(frames) as usize];
        let classes = [Class::Kernel, Class::PageTable, Class::UserData, Class::FileActive];
        for pfn in 0..frames {
            let c = if is_free(pfn) { Class::Free } else { classes[(pfn % 4) as usize] };
            set_class(&mut prio, pfn, c).unwrap();
            set_free_bit(&mut free, pfn, c == Class::Free).unwrap();
        }
        Ok(GuestMaps::new(free, prio, frames, json!({"fake": true})).unwrap())
    }
    fn enlighten_release(&self) -> migrate::Result<()> {
        self.released.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn progress(&self) -> Value {
        json!([])
    }
    fn discard_memory(&self) {}
    fn migrated(&self) {
        self.migrated.store(true, Ordering::Release);
    }
    fn committed(&self) {
        if let Some(f) = self.on_commit.lock().unwrap().take() {
            f();
        }
    }
}

struct FakeHost;

impl IncomingVm for FakeHost {
    fn memory_for(&self, config: &[u8]) -> migrate::Result<GuestMem> {
        let v: Value = serde_json::from_slice(config).map_err(|e| e.to_string())?;
        let regions: Vec<(u64, u64)> = serde_json::from_value(v["regions"].clone()).map_err(|e| e.to_string())?;
        Ok(memory(&regions))
    }
}

fn page(mem: &GuestMem, gpa: u64) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_SIZE as usize];
    mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
    b
}

const SECRET: &[u8] = b"engine test key, at least thirty-two bytes long";

fn tls() -> Credentials {
    Credentials::shared_key(SECRET).unwrap()
}

/// Migrates a fresh fake VM in `mode` over TLS; returns the source's report
/// after checking every destination page against the source at suspension.
fn migrate_in(mode: Mode) -> Value {
    migrate_with(mode, tls())
}

fn migrate_with(mode: Mode, key: Credentials) -> Value {
    let vm = FakeVm::new();
    std::thread::sleep(Duration::from_millis(50)); // the vCPU is writing
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let dest_key = key.clone();
    let dest = std::thread::spawn(move || {
        let mut inc = migrate::receive::accept(&listener, &dest_key, &FakeHost);
        assert_eq!(inc.state, STATE);
        inc.confirm().unwrap();
        if let Some(mut pc) = inc.postcopy.take() {
            pc.wait_go(&inc.stream).unwrap();
            let d = pc.dest.clone();
            pc.finish_in_background(&inc.stream, Box::new(|_, _| {})).unwrap();
            // The destination's "vCPU": reads every page now (faults).
            let mem = inc.mem.clone();
            std::thread::spawn(move || {
                for &(base, len) in REGIONS.iter().rev() {
                    for gpa in (base..base + len).step_by(PAGE_SIZE as usize * 7) {
                        let _: u64 = mem.read_obj(GuestAddress(gpa)).unwrap();
                    }
                }
            });
            (inc, Some(d))
        } else {
            (inc, None)
        }
    });
    let report = migrate::source::migrate(&vm, &to, &key, mode).unwrap_or_else(|e| panic!("{mode:?}: {e}")).to_json();
    let (inc, pc) = dest.join().unwrap();
    if let Some(d) = pc {
        assert!(d.done.load(Ordering::Acquire), "every page present once the source is acknowledged");
    }
    assert!(vm.migrated.load(Ordering::Acquire));
    assert!(*vm.paused.lock().unwrap(), "the source stays paused after the migration");
    assert_eq!(report["integrity"]["match"], true, "{report}");
    let enlightened = mode == Mode::Enlightened;
    for &(base, len) in &REGIONS {
        for gpa in (base..base + len).step_by(PAGE_SIZE as usize) {
            let want = if enlightened && is_free(gpa / PAGE_SIZE) {
                vec![0u8; PAGE_SIZE as usize]
            } else {
                page(&vm.mem, gpa)
            };
            assert!(page(&inc.mem, gpa) == want, "{mode:?}: page {gpa:#x} differs");
        }
    }
    report
}

#[test]
fn stop_and_copy_sends_state_and_every_nonzero_page() {
    let r = migrate_in(Mode::StopAndCopy);
    let pages: u64 = REGIONS.iter().map(|r| r.1 / PAGE_SIZE).sum();
    assert_eq!(r["pages_at_switchover"], pages - pages / 4, "{r}");
    assert_eq!(r["mode"], "stop-and-copy");
}

#[test]
fn precopy_iterates_then_sends_only_what_was_dirtied() {
    let r = migrate_in(Mode::Precopy);
    let rounds = r["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty(), "{r}");
    let first = rounds[0]["pages"].as_u64().unwrap();
    let last = r["pages_at_switchover"].as_u64().unwrap();
    assert!(last < first, "the switch-over sends fewer pages than round 0: {r}");
    assert!(r["bytes"]["precopy"].as_u64().unwrap() > 0);
}

#[test]
fn postcopy_pushes_and_serves_faults() {
    let r = migrate_in(Mode::Postcopy);
    assert_eq!(r["free_pages_sent"], 0);
    assert_eq!(r["rounds"].as_array().unwrap().len(), 1, "{r}");
    assert!(r["destination"].is_object(), "{r}");
}

#[test]
fn enlightened_rounds_follow_the_classes_and_never_send_free_pages() {
    let r = migrate_in(Mode::Enlightened);
    assert_eq!(r["free_pages_sent"], 0, "{r}");
    let free: u64 = FREE.iter().map(|f| f.1).sum();
    assert_eq!(r["pages"]["free"], free, "{r}");
    let names: Vec<&str> = r["rounds"].as_array().unwrap().iter().filter_map(|x| x["name"].as_str()).collect();
    assert_eq!(names[0], Class::Kernel.name(), "{names:?}");
    assert!(r["bytes"]["free_info"].as_u64().unwrap() > 0);
}

#[test]
fn a_refused_migration_leaves_the_source_running() {
    let vm = FakeVm::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let key = tls();
    let dest_key = key.clone();
    let dest = std::thread::spawn(move || {
        let mut inc = migrate::receive::accept(&listener, &dest_key, &FakeHost);
        inc.refuse("no room for this VM");
    });
    let before = vm.writes.load(Ordering::Relaxed);
    let e = migrate::source::migrate(&vm, &to, &key, Mode::StopAndCopy).unwrap_err();
    dest.join().unwrap();
    assert!(e.to_string().contains("no room for this VM"), "{e}");
    assert!(!vm.migrated.load(Ordering::Acquire));
    std::thread::sleep(Duration::from_millis(50));
    assert!(vm.writes.load(Ordering::Relaxed) > before, "the VM runs on");
    assert!(vm.status.json().is_none(), "no migration in progress afterwards");
}

#[test]
fn plaintext_only_when_both_ends_ask_and_a_tls_source_never_talks_to_it() {
    // --insecure at both ends: the same protocol without TLS.
    let r = migrate_with(Mode::Postcopy, Credentials::insecure(Key::derive(SECRET)));
    assert_eq!(r["integrity"]["match"], true, "{r}");
    // A TLS source and a plaintext destination (or a wrong key) never start a migration.
    let vm = FakeVm::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let plain = Credentials::insecure(Key::derive(SECRET));
        migrate::receive::accept(&listener, &plain, &FakeHost);
    });
    let e = migrate::source::migrate(&vm, &to, &tls(), Mode::StopAndCopy).unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
    let wrong = Credentials::shared_key(b"another key, also thirty-two bytes or more").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        migrate::receive::accept(&listener, &wrong, &FakeHost);
    });
    let e = migrate::source::migrate(&vm, &to, &tls(), Mode::Enlightened).unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
    assert!(!vm.migrated.load(Ordering::Acquire));
    assert!(vm.status.json().is_none(), "no migration in progress afterwards");
}

/// A TCP relay to `to` whose current connections can be cut at once (new
/// ones pass again), as a link that breaks and comes back.
struct Relay {
    addr: String,
    live: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start(to: String) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let live = Arc::new(Mutex::new(Vec::new()));
        let live2 = live.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(a) = c else { return };
                let Ok(b) = std::net::TcpStream::connect(&to) else { continue };
                let _ = (a.set_nodelay(true), b.set_nodelay(true));
                live2.lock().unwrap().extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
                for (mut x, mut y) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut x, &mut y);
                        let _ = y.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { addr, live }
    }
    fn cut(&self) {
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_commit_lost_with_the_link_completes_on_reconnection() {
    // The link breaks exactly at the post-copy commit: the source has committed (it never
    // runs the VM again) but its `Go` never arrives. The source reconnects with the
    // migration's token; the destination takes that as the commit and runs the VM, and
    // every page arrives.
    let vm = FakeVm::new();
    std::thread::sleep(Duration::from_millis(50));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = Arc::new(Relay::start(listener.local_addr().unwrap().to_string()));
    let r2 = relay.clone();
    *vm.on_commit.lock().unwrap() = Some(Box::new(move || r2.cut()));
    let creds = tls();
    let dest_creds = creds.clone();
    let dest = std::thread::spawn(move || {
        let mut inc = migrate::receive::accept(&listener, &dest_creds, &FakeHost);
        inc.confirm().unwrap();
        let mut pc = inc.postcopy.take().expect("post-copy");
        pc.wait_go(&inc.stream).expect("the reconnection commits");
        let d = pc.dest.clone();
        pc.finish_in_background(&inc.stream, Box::new(|_, _| {})).unwrap();
        let t = std::time::Instant::now();
        while !d.done.load(Ordering::Acquire) {
            assert!(t.elapsed() < Duration::from_secs(60), "every page arrives");
            std::thread::sleep(Duration::from_millis(20));
        }
        inc
    });
    let report = migrate::source::migrate(&vm, &relay.addr, &creds, Mode::Postcopy).unwrap().to_json();
    let inc = dest.join().unwrap();
    assert_eq!(report["integrity"]["match"], true, "{report}");
    assert!(report["reconnections"].as_u64().unwrap_or(0) >= 1, "{report}");
    assert!(vm.migrated.load(Ordering::Acquire));
    assert!(*vm.paused.lock().unwrap(), "the source never resumed its committed VM");
    for &(base, len) in &REGIONS {
        for gpa in (base..base + len).step_by(PAGE_SIZE as usize) {
            assert!(page(&inc.mem, gpa) == page(&vm.mem, gpa), "page {gpa:#x} differs");
        }
    }
}
