// SPDX-License-Identifier: MIT OR GPL-2.0-only
//! `enlcheck`: the guest-side checker of the enlightenment acceptance test
//! (guest-module/tests/qemu-enlighten.sh). A static binary in the guest's
//! root file system (built by build-image.sh with the chroot's rustc, std
//! only). It checks the guest module's maps, read from debugfs, against the
//! kernel's own views: /proc/kpageflags, /proc/PID/pagemap, /proc/iomem.
//!
//!   enlcheck fill PORT MIB            fill memcached on 127.0.0.1:PORT with MIB of values
//!   enlcheck check MEMCACHED_PID IDLE_PID
//!   enlcheck hog MIB SECS             allocate and touch MIB, free, repeat for SECS
//!   enlcheck mallocbench N            ns per malloc/free pair (thesis 5.4.4-like)
//!   enlcheck mc-write PORT FIRST N    set keys kh<FIRST>..kh<FIRST+N-1> to their known values
//!   enlcheck mc-verify PORT FIRST N   get them back: prints `ok=N bad=N missing=N`
//!   enlcheck mc-load PORT [BATCH] [PERIOD_MS]
//!                                     forever: write BATCH (50) new keys, verify every key
//!                                     written so far, print one status line, sleep PERIOD_MS (2000)
//!
//! `mc-load`'s status line (scripts/kvm-host reads it across snapshots and
//! migrations; counts are cumulative, the verification is of the last tick):
//!   MC-STATUS tick=N uptime_ms=N written=N verified_ok=N verified_bad=N verified_missing=N
//!     memfree_kb=N holding=N softlockups=N clocksource=N verify_ms=N errors=N
//! `holding` is the module's debugfs counter (-1 without the module),
//! `softlockups` counts soft lockups and RCU stalls in dmesg, `clocksource`
//! the clocksource watchdog's complaints (a clock marked unstable; the
//! boot-time "TSCs unsynchronized" check is not counted).
//!
//! `check` prints `CHECK name=value` lines and `T-OK:`/`T-FAIL:` verdicts;
//! it exits 1 if a hard check fails.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const DEBUGFS: &str = "/sys/kernel/debug/enlighten";
// Class values (bitmap-abi/src/wire.rs).
const KERNEL: u8 = 0;
const KERNEL_ALLOCATED: u8 = 1;
const PAGE_TABLE: u8 = 3;
const USER_CODE: u8 = 4;
const USER_DATA: u8 = 5;
const FILE_ACTIVE: u8 = 6;
const FILE_INACTIVE: u8 = 7;
const OTHER: u8 = 8;
const FREE: u8 = 9;
// /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h).
const KPF_LRU: u64 = 1 << 5;
const KPF_SLAB: u64 = 1 << 7;
const KPF_BUDDY: u64 = 1 << 10;
const KPF_MMAP: u64 = 1 << 11;
const KPF_ANON: u64 = 1 << 12;
const KPF_ZERO_PAGE: u64 = 1 << 24;
const KPF_PGTABLE: u64 = 1 << 26;

fn read_u64s(path: &str, first: u64, n: u64) -> std::io::Result<Vec<u64>> {
    let mut f = fs::File::open(path)?;
    f.seek(SeekFrom::Start(first * 8))?;
    let mut buf = vec![0u8; (n * 8) as usize];
    let mut got = 0;
    while got < buf.len() {
        let r = f.read(&mut buf[got..])?;
        if r == 0 {
            break;
        }
        got += r;
    }
    buf.truncate(got - got % 8);
    Ok(buf.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
}

fn read_num(name: &str) -> u64 {
    fs::read_to_string(format!("{DEBUGFS}/{name}")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

struct Maps {
    frames: u64,
    free: Vec<u8>,
    prio: Vec<u8>,
}

impl Maps {
    fn load() -> Result<Maps, String> {
        let frames = read_num("frames");
        let free = fs::read(format!("{DEBUGFS}/free_bitmap")).map_err(|e| format!("free_bitmap: {e}"))?;
        let prio = fs::read(format!("{DEBUGFS}/priority_map")).map_err(|e| format!("priority_map: {e}"))?;
        if frames == 0 || free.len() as u64 != frames.div_ceil(8) || prio.len() as u64 != frames.div_ceil(2) {
            return Err(format!("maps of {} / {} bytes for {frames} frames", free.len(), prio.len()));
        }
        Ok(Maps { frames, free, prio })
    }
    fn is_free(&self, pfn: u64) -> bool {
        pfn < self.frames && self.free[(pfn / 8) as usize] & (1 << (pfn % 8)) != 0
    }
    fn class(&self, pfn: u64) -> u8 {
        if pfn >= self.frames {
            return 255;
        }
        let b = self.prio[(pfn / 2) as usize];
        if pfn % 2 == 0 {
            b & 0xf
        } else {
            b >> 4
        }
    }
}

/// Present pages of a process: (pfn, exclusive anon?, vma executable?).
fn process_pages(pid: u32) -> Result<Vec<(u64, bool, bool)>, String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    let pagemap = format!("/proc/{pid}/pagemap");
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let range = it.next().unwrap_or("");
        let perms = it.next().unwrap_or("");
        let Some((a, b)) = range.split_once('-') else { continue };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else { continue };
        if line.ends_with("[vsyscall]") {
            continue;
        }
        let entries = read_u64s(&pagemap, a / 4096, (b - a) / 4096).map_err(|e| format!("{pagemap}: {e}"))?;
        for e in entries {
            if e & (1 << 63) == 0 {
                continue;
            }
            let pfn = e & ((1 << 55) - 1);
            let exclusive_anon = e & (1 << 56) != 0 && e & (1 << 61) == 0;
            out.push((pfn, exclusive_anon, perms.contains('x')));
        }
    }
    Ok(out)
}

fn kernel_code_pfns() -> Option<(u64, u64)> {
    let iomem = fs::read_to_string("/proc/iomem").ok()?;
    for l in iomem.lines() {
        if l.trim_end().ends_with(": Kernel code") {
            let (r, _) = l.trim().split_once(" : ")?;
            let (a, b) = r.split_once('-')?;
            return Some((u64::from_str_radix(a, 16).ok()? / 4096, u64::from_str_radix(b, 16).ok()? / 4096 + 1));
        }
    }
    None
}

fn pct(n: u64, d: u64) -> f64 {
    if d == 0 {
        100.0
    } else {
        n as f64 * 100.0 / d as f64
    }
}

fn check(memcached: u32, idle: u32) -> Result<bool, String> {
    let maps = Maps::load()?;
    let mut ok = true;
    let mut verdict = |good: bool, what: String| {
        println!("{}: {what}", if good { "T-OK" } else { "T-FAIL" });
        ok &= good;
    };
    let t = Instant::now();
    let flags = read_u64s("/proc/kpageflags", 0, maps.frames).map_err(|e| format!("/proc/kpageflags: {e}"))?;
    // 1. No free-marked frame is mapped, in the page cache, in slab or in the buddy allocator.
    let (mut free, mut bad_mapped, mut bad_lru, mut bad_slab, mut bad_buddy, mut bad_pt) = (0u64, 0u64, 0, 0, 0, 0);
    for (pfn, &f) in flags.iter().enumerate() {
        if !maps.is_free(pfn as u64) {
            continue;
        }
        free += 1;
        bad_mapped += u64::from(f & (KPF_MMAP | KPF_ANON) != 0);
        bad_lru += u64::from(f & KPF_LRU != 0);
        bad_slab += u64::from(f & KPF_SLAB != 0);
        bad_buddy += u64::from(f & KPF_BUDDY != 0);
        bad_pt += u64::from(f & KPF_PGTABLE != 0);
    }
    println!("CHECK free_frames={free} free_mapped={bad_mapped} free_lru={bad_lru} free_slab={bad_slab} free_buddy={bad_buddy} free_pgtable={bad_pt}");
    verdict(free > 0, format!("{free} frames marked free"));
    verdict(
        bad_mapped + bad_lru + bad_slab + bad_buddy + bad_pt == 0,
        "no free-marked frame is mapped, in the page cache, in slab, in the buddy allocator or a page table".into(),
    );
    // 2. Classes against kpageflags.
    let (mut pt, mut pt_ok, mut slab, mut slab_ok, mut cache, mut cache_ok) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    // Frames that became page tables or slab after the Prepare: mostly free
    // then (Other: the reserve the sweep left), a few recycled from processes
    // that exited since (the test's shell loops).
    let (mut pt_wrong, mut slab_wrong) = (0u64, 0u64);
    for (pfn, &f) in flags.iter().enumerate() {
        let c = maps.class(pfn as u64);
        if f & KPF_PGTABLE != 0 {
            pt += 1;
            pt_ok += u64::from(c == PAGE_TABLE);
            pt_wrong += u64::from(c != PAGE_TABLE && c != OTHER);
        }
        if f & KPF_SLAB != 0 {
            slab += 1;
            slab_ok += u64::from(c == KERNEL_ALLOCATED);
            slab_wrong += u64::from(c != KERNEL_ALLOCATED && c != OTHER);
        }
        if f & KPF_LRU != 0 && f & KPF_ANON == 0 {
            cache += 1;
            cache_ok += u64::from(matches!(c, FILE_ACTIVE | FILE_INACTIVE | USER_CODE | USER_DATA));
        }
    }
    println!("CHECK pgtable={pt} pgtable_as_page_table={pt_ok} ({:.1}%) slab={slab} slab_as_kernel_allocated={slab_ok} ({:.1}%) page_cache={cache} page_cache_as_file_or_user={cache_ok}", pct(pt_ok, pt), pct(slab_ok, slab));
    // Page tables and slab pages created after the Prepare (by this checker
    // and the test's shell) come from frames that were free then.
    verdict(
        pct(pt_ok, pt) >= 90.0,
        format!("page-table pages are Page_Table ({pt_ok}/{pt}; others: {} Other, {pt_wrong} another class)", pt - pt_ok - pt_wrong),
    );
    verdict(
        pct(slab_ok, slab) >= 90.0,
        format!("slab pages are Kernel_Allocated ({slab_ok}/{slab}; others: {} Other, {slab_wrong} another class)", slab - slab_ok - slab_wrong),
    );
    // 3. Kernel text.
    match kernel_code_pfns() {
        Some((a, b)) => {
            let n = b - a;
            let k = (a..b).filter(|&p| maps.class(p) == KERNEL).count() as u64;
            println!("CHECK kernel_code_pfns={a:#x}-{b:#x} kernel_code_as_kernel={k}/{n}");
            verdict(k == n, format!("kernel text is Kernel ({k}/{n})"));
        }
        None => verdict(false, "no 'Kernel code' in /proc/iomem".into()),
    }
    // 4. memcached's resident pages are User_Code/User_Data.
    // The shared zero page (kernel memory) backs untouched anonymous memory
    // that was only read; it is not the process's page.
    let zero = |p: u64| flags.get(p as usize).is_some_and(|f| f & KPF_ZERO_PAGE != 0);
    let pages: Vec<_> = process_pages(memcached)?.into_iter().filter(|(p, _, _)| !zero(*p)).collect();
    let mut other = [0u64; 16];
    for (p, _, _) in &pages {
        let c = maps.class(*p);
        if !matches!(c, USER_CODE | USER_DATA) {
            other[usize::from(c.min(15))] += 1;
        }
    }
    println!("CHECK memcached_non_user_by_class={other:?}");
    let mut shown = std::collections::BTreeMap::new();
    for (p, _, x) in &pages {
        if !matches!(maps.class(*p), USER_CODE | USER_DATA) {
            *shown.entry((*p, *x)).or_insert(0u32) += 1;
        }
    }
    for ((p, x), n) in shown.iter().take(6) {
        println!("CHECK memcached_non_user pfn={p:#x} exec={x} mappings={n} class={} kpageflags={:#x}", maps.class(*p), flags.get(*p as usize).copied().unwrap_or(0));
    }
    let n = pages.len() as u64;
    let user = pages.iter().filter(|(p, _, _)| matches!(maps.class(*p), USER_CODE | USER_DATA)).count() as u64;
    let code = pages.iter().filter(|(p, _, _)| maps.class(*p) == USER_CODE).count() as u64;
    let mc_free = pages.iter().filter(|(p, _, _)| maps.is_free(*p)).count() as u64;
    println!("CHECK memcached_resident={n} memcached_user={user} ({:.2}%) memcached_user_code={code} memcached_free={mc_free}", pct(user, n));
    verdict(n > 1000 && pct(user, n) >= 99.0, format!("memcached: {:.2}% of {n} resident pages are User_Code/User_Data", pct(user, n)));
    verdict(mc_free == 0, "no memcached page is marked free".into());
    // 5. The idle process's own pages are not in the active-process classes.
    let idle_pages: Vec<_> = process_pages(idle)?.into_iter().filter(|(p, _, _)| !zero(*p)).collect();
    let own: Vec<_> = idle_pages.iter().filter(|(_, excl, _)| *excl).collect();
    let own_active = own.iter().filter(|(p, _, _)| matches!(maps.class(*p), USER_CODE | USER_DATA)).count();
    println!("CHECK idle_resident={} idle_exclusive_anon={} idle_exclusive_in_active_classes={own_active}", idle_pages.len(), own.len());
    verdict(!own.is_empty() && own_active == 0, format!("idle process: {own_active} of its {} own pages in active classes", own.len()));
    let free_class = (0..maps.frames).filter(|&p| maps.class(p) == FREE).count() as u64;
    verdict(free_class == free, format!("Free class ({free_class}) = free bitmap ({free})"));
    println!("CHECK check_ms={}", t.elapsed().as_millis());
    Ok(ok)
}

fn fill(port: u16, mib: u64) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    let value = vec![b'x'; 1000];
    let n = mib * 1024;
    let mut batch = Vec::with_capacity(1 << 20);
    for i in 0..n {
        batch.extend_from_slice(format!("set key{i} 0 0 {} noreply\r\n", value.len()).as_bytes());
        batch.extend_from_slice(&value);
        batch.extend_from_slice(b"\r\n");
        if batch.len() > 512 * 1024 || i + 1 == n {
            s.write_all(&batch).map_err(|e| format!("write: {e}"))?;
            batch.clear();
        }
    }
    s.write_all(format!("get key{}\r\nquit\r\n", n - 1).as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| format!("read: {e}"))?;
    if !reply.contains("VALUE") {
        return Err(format!("last key not stored: {reply:?}"));
    }
    println!("filled {n} items of {} bytes", value.len());
    Ok(())
}

fn hog(mib: usize, secs: u64) {
    // Grows to `mib` in 1 MiB steps (so Prepares land while it allocates),
    // holds, frees, repeats. Between Ready and Done (debugfs `holding`) it
    // does not allocate: a migrating VM is suspended then (the test's host
    // also stops QEMU, but only after a control round trip, while a TCG
    // guest allocating at full speed would already have eaten the reserve
    // the sweep leaves).
    let end = Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0u64;
    while Instant::now() < end {
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        for _ in 0..mib {
            while read_num("holding") != 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut v = vec![0u8; 1 << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            chunks.push(v);
            std::thread::sleep(Duration::from_millis(2));
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(500));
        drop(chunks);
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("hog: {rounds} rounds of {mib} MiB");
}

/// A malloc/free microbenchmark: `n` allocations of 16..4 KiB (xorshift
/// sizes), each written and freed while a ring of 64 stays live. Prints and
/// returns ns per allocation+free (best of 3 runs).
fn mallocbench(n: u64) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut ring: Vec<Vec<u8>> = (0..64).map(|_| Vec::new()).collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let t = Instant::now();
        for i in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let size = 16 + (x % 4080) as usize;
            let mut v = Vec::with_capacity(size);
            v.push(i as u8);
            ring[(i % 64) as usize] = v;
        }
        std::hint::black_box(&ring);
        best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
    }
    println!("mallocbench: {best:.1} ns per malloc/free");
    best
}

/// The known value of key `kh<i>`: 100 bytes derived from `i`.
fn mc_value(i: u64) -> Vec<u8> {
    let mut v = format!("{i:010}-").into_bytes();
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < 100 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(b'a' + (x % 26) as u8);
    }
    v
}

struct Mc {
    port: u16,
    conn: Option<(TcpStream, std::io::BufReader<TcpStream>)>,
}

impl Mc {
    fn new(port: u16) -> Mc {
        Mc { port, conn: None }
    }
    fn conn(&mut self) -> Result<&mut (TcpStream, std::io::BufReader<TcpStream>), String> {
        if self.conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
            let r = std::io::BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
            self.conn = Some((s, r));
        }
        Ok(self.conn.as_mut().unwrap())
    }
    /// Runs `f` on the connection; drops the connection on error.
    fn with<T>(&mut self, f: impl FnOnce(&mut TcpStream, &mut std::io::BufReader<TcpStream>) -> Result<T, String>) -> Result<T, String> {
        let r = match self.conn() {
            Ok((s, rd)) => f(s, rd),
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.conn = None;
        }
        r
    }
    fn write(&mut self, first: u64, n: u64) -> Result<(), String> {
        self.with(|s, rd| {
            let mut batch = Vec::new();
            for i in first..first + n {
                let v = mc_value(i);
                batch.extend_from_slice(format!("set kh{i} 0 0 {}\r\n", v.len()).as_bytes());
                batch.extend_from_slice(&v);
                batch.extend_from_slice(b"\r\n");
            }
            s.write_all(&batch).map_err(|e| format!("write: {e}"))?;
            for i in first..first + n {
                let mut line = String::new();
                use std::io::BufRead;
                rd.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
                if line != "STORED\r\n" {
                    return Err(format!("set kh{i}: {:?}", line.trim_end()));
                }
            }
            Ok(())
        })
    }
    /// (ok, bad, missing) over keys first..first+n.
    fn verify(&mut self, first: u64, n: u64) -> Result<(u64, u64, u64), String> {
        use std::io::BufRead;
        self.with(|s, rd| {
            let (mut ok, mut bad, mut missing) = (0u64, 0u64, 0u64);
            let mut i = first;
            while i < first + n {
                let m = (first + n - i).min(100);
                let mut req = String::from("get");
                for k in i..i + m {
                    req.push_str(&format!(" kh{k}"));
                }
                req.push_str("\r\n");
                s.write_all(req.as_bytes()).map_err(|e| format!("write: {e}"))?;
                let mut seen = 0u64;
                loop {
                    let mut line = String::new();
                    rd.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
                    if line == "END\r\n" {
                        break;
                    }
                    // VALUE <key> <flags> <bytes>
                    let f: Vec<&str> = line.split_whitespace().collect();
                    if f.len() < 4 || f[0] != "VALUE" {
                        return Err(format!("get: unexpected reply {:?}", line.trim_end()));
                    }
                    let len: usize = f[3].parse().map_err(|_| format!("get: bad length in {line:?}"))?;
                    let mut data = vec![0u8; len + 2];
                    rd.read_exact(&mut data).map_err(|e| format!("read: {e}"))?;
                    let key: Option<u64> = f[1].strip_prefix("kh").and_then(|k| k.parse().ok());
                    match key {
                        Some(k) if (i..i + m).contains(&k) && data[..len] == mc_value(k)[..] => ok += 1,
                        _ => bad += 1,
                    }
                    seen += 1;
                }
                missing += m.saturating_sub(seen);
                i += m;
            }
            Ok((ok, bad, missing))
        })
    }
}

/// Counts (soft lockups and RCU stalls, clocksource complaints) in dmesg.
fn dmesg_complaints() -> (i64, i64) {
    let Ok(out) = std::process::Command::new("dmesg").output() else { return (-1, -1) };
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut lockups, mut clock) = (0, 0);
    for l in text.lines() {
        if l.contains("soft lockup") || l.contains("self-detected stall") || l.contains("detected stalls on CPUs") {
            lockups += 1;
        }
        let lc = l.to_ascii_lowercase();
        // "Marking TSC unstable due to TSCs unsynchronized" is the boot-time
        // TSC sync check, not the watchdog: under a nested host whose own TSCs
        // are unsynchronized (QEMU TCG) every boot logs it once.
        let boot_sync_check = lc.contains("tscs unsynchronized");
        if (lc.contains("clocksource") || lc.contains("tsc")) && (lc.contains("unstable") || lc.contains("watchdog")) && !boot_sync_check {
            clock += 1;
        }
    }
    (lockups, clock)
}

fn memfree_kb() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemFree:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn mc_load(port: u16, batch: u64, period: Duration) -> ! {
    let mut mc = Mc::new(port);
    let (mut written, mut errors) = (0u64, 0u64);
    let boot = || fs::read_to_string("/proc/uptime").ok().and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok()).unwrap_or(0.0);
    for tick in 1u64.. {
        match mc.write(written, batch) {
            Ok(()) => written += batch,
            Err(e) => {
                errors += 1;
                println!("MC-ERROR tick={tick} {e}");
            }
        }
        let t = Instant::now();
        let (ok, bad, missing) = mc.verify(0, written).unwrap_or_else(|e| {
            errors += 1;
            println!("MC-ERROR tick={tick} {e}");
            (0, 0, written)
        });
        let verify_ms = t.elapsed().as_millis();
        let holding = fs::read_to_string(format!("{DEBUGFS}/holding")).ok().and_then(|s| s.trim().parse::<i64>().ok()).unwrap_or(-1);
        let (lockups, clock) = dmesg_complaints();
        println!(
            "MC-STATUS tick={tick} uptime_ms={} written={written} verified_ok={ok} verified_bad={bad} verified_missing={missing} memfree_kb={} holding={holding} softlockups={lockups} clocksource={clock} verify_ms={verify_ms} errors={errors}",
            (boot() * 1000.0) as u64,
            memfree_kb()
        );
        std::thread::sleep(period);
    }
    unreachable!()
}

fn main() -> ExitCode {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize| a.get(i).cloned().unwrap_or_default();
    let r = match arg(1).as_str() {
        "fill" => fill(arg(2).parse().unwrap_or(11211), arg(3).parse().unwrap_or(32)).map(|_| true),
        "check" => check(arg(2).parse().unwrap_or(0), arg(3).parse().unwrap_or(0)),
        "hog" => {
            hog(arg(2).parse().unwrap_or(128), arg(3).parse().unwrap_or(10));
            Ok(true)
        }
        "mallocbench" => {
            mallocbench(arg(2).parse().unwrap_or(1_000_000));
            Ok(true)
        }
        "mc-write" => {
            let (first, n) = (arg(3).parse().unwrap_or(0), arg(4).parse().unwrap_or(100));
            Mc::new(arg(2).parse().unwrap_or(11211)).write(first, n).map(|_| {
                println!("wrote {n} keys from kh{first}");
                true
            })
        }
        "mc-verify" => {
            let (first, n) = (arg(3).parse().unwrap_or(0), arg(4).parse().unwrap_or(100));
            Mc::new(arg(2).parse().unwrap_or(11211)).verify(first, n).map(|(ok, bad, missing)| {
                println!("ok={ok} bad={bad} missing={missing}");
                bad == 0 && missing == 0
            })
        }
        "mc-load" => mc_load(
            arg(2).parse().unwrap_or(11211),
            arg(3).parse().unwrap_or(50),
            Duration::from_millis(arg(4).parse().unwrap_or(2000)),
        ),
        _ => Err("usage: enlcheck fill PORT MIB | check MEMCACHED_PID IDLE_PID | hog MIB SECS | mallocbench N | mc-write PORT FIRST N | mc-verify PORT FIRST N | mc-load PORT [BATCH] [PERIOD_MS]".into()),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("T-FAIL: enlcheck: {e}");
            ExitCode::FAILURE
        }
    }
}
