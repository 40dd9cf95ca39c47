//! Lazily populated guest memory.
//!
//! A [`Pager`] registers guest RAM mappings with userfaultfd (MISSING mode).
//! From then on, any access to a page that has not been installed — by a
//! vCPU through KVM, or by a VMM thread — blocks and is reported by
//! [`Pager::wait_fault`]. Pages are installed atomically with
//! [`Pager::install`] (UFFDIO_COPY) or [`Pager::install_zero`]
//! (UFFDIO_ZEROPAGE), from any thread: a push thread and a demand-fault
//! thread can race for the same page and exactly one wins, the other learns
//! it was already present. Installing wakes whoever waits on the page.
//!
//! One fault loop ([`faults::serve`], answering each fault from a
//! [`PageSource`]) serves post-copy migration (pages pushed in priority order,
//! faults requested on demand) and appliance streaming (chunks from a server).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use userfaultfd::{Event, RegisterMode, Uffd, UffdBuilder};

pub mod faults;
pub mod staging;
pub use faults::{serve, Answer, Latencies, PageSource};
pub use staging::Staging;

/// Page size the pager works in.
pub const PAGE_SIZE: u64 = 4096;

/// A guest RAM mapping to manage.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    /// Guest-physical address of the first byte.
    pub guest_base: u64,
    /// Host virtual address of the mapping (page aligned).
    pub host_addr: usize,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub len: usize,
}

struct RegionState {
    region: Region,
    /// One bit per page: installed.
    present: Vec<AtomicU64>,
    /// One bit per page: known zero and deliberately left unmapped
    /// ([`Pager::defer`]); it faults like a missing page.
    deferred: Vec<AtomicU64>,
    /// One bit per page: present or deferred (no longer counted missing).
    settled: Vec<AtomicU64>,
}

fn set_bit(bits: &[AtomicU64], page: u64) -> bool {
    let bit = 1u64 << (page % 64);
    bits[(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
}

fn get_bit(bits: &[AtomicU64], page: u64) -> bool {
    bits[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
}

impl RegionState {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.region.guest_base
            && gpa.checked_add(len).is_some_and(|end| end <= self.region.guest_base + self.region.len as u64)
    }

    /// Marks a page present; true if it was not counted missing before
    /// (neither present nor deferred) and so leaves the missing count.
    fn mark(&self, page: u64) -> bool {
        set_bit(&self.present, page);
        set_bit(&self.settled, page)
    }

    fn is_present(&self, page: u64) -> bool {
        get_bit(&self.present, page)
    }
}

/// Result of an installation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The pages were installed by this call.
    New,
    /// Every page was already present; nothing changed.
    AlreadyPresent,
}

/// Counters, readable at any time.
#[derive(Default)]
pub struct Counters {
    pub faults: AtomicU64,
    pub installed: AtomicU64,
    pub zeroed: AtomicU64,
    pub raced: AtomicU64,
}

/// Guest memory under userfaultfd control.
pub struct Pager {
    uffd: Uffd,
    regions: Vec<RegionState>,
    missing: AtomicU64,
    /// The kernel moves pages into place (`UFFDIO_MOVE`, Linux 6.8+).
    can_move: bool,
    pub counters: Counters,
}

/// Huge page size of [`Pager::move_block`] and [`Staging`].
pub const BLOCK_SIZE: u64 = 2 << 20;

/// `UFFD_FEATURE_MOVE` and the `UFFDIO_MOVE` ioctl (Linux 6.8; not in the
/// userfaultfd crate yet).
const UFFD_FEATURE_MOVE: u64 = 1 << 10;
#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_MOVE, 0xAA, 0x05, UffdioMove);

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn uffd_err(e: userfaultfd::Error) -> io::Error {
    match e {
        userfaultfd::Error::SystemError(errno) => io::Error::from_raw_os_error(errno as i32),
        other => io::Error::other(other.to_string()),
    }
}

impl Pager {
    /// Registers the regions with a new userfaultfd. Every page starts
    /// missing.
    ///
    /// # Safety
    /// Each region must be a live, private anonymous (or shmem) mapping of
    /// `len` bytes at `host_addr` that outlives the pager, and nothing else
    /// may register it with userfaultfd.
    pub unsafe fn register(regions: &[Region]) -> io::Result<Self> {
        let build = |features: u64| {
            UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(false)
                .require_features(userfaultfd::FeatureFlags::from_bits_retain(features))
                .create()
        };
        // UFFDIO_MOVE where the kernel has it; plain copies otherwise.
        let (uffd, can_move) = match build(UFFD_FEATURE_MOVE) {
            Ok(u) => (u, true),
            Err(_) => (
                build(0).map_err(|e| {
                    io::Error::other(format!(
                        "cannot create a userfaultfd (root or vm.unprivileged_userfaultfd=1 needed): {e}"
                    ))
                })?,
                false,
            ),
        };
        let mut states = Vec::with_capacity(regions.len());
        let mut missing = 0;
        for r in regions {
            if r.len == 0 || r.len as u64 % PAGE_SIZE != 0 || r.host_addr as u64 % PAGE_SIZE != 0 {
                return Err(invalid(format!("region {r:?} is not page aligned")));
            }
            uffd.register_with_mode(r.host_addr as *mut libc::c_void, r.len, RegisterMode::MISSING)
                .map_err(|e| io::Error::other(format!("registering {r:?} with userfaultfd: {e}")))?;
            let pages = r.len as u64 / PAGE_SIZE;
            missing += pages;
            let bits = || (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
            states.push(RegionState { region: *r, present: bits(), deferred: bits(), settled: bits() });
        }
        Ok(Self { uffd, regions: states, missing: AtomicU64::new(missing), can_move, counters: Counters::default() })
    }

    /// Whether [`Pager::move_block`] can place huge pages (UFFDIO_MOVE).
    pub fn can_move(&self) -> bool {
        self.can_move
    }

    /// Settles known-zero pages over `[gpa, gpa+len)` without mapping them:
    /// they no longer count as missing, but stay unmapped (after
    /// [`Pager::unregister`] the kernel backs them on first touch, with a
    /// huge page where the whole 2 MiB is untouched); until then a fault on
    /// one is reported like any missing page. Returns how many pages were
    /// newly settled.
    pub fn defer(&self, gpa: u64, len: u64) -> io::Result<u64> {
        let r = self.find(gpa, len)?;
        let first = (gpa - r.region.guest_base) / PAGE_SIZE;
        let mut n = 0;
        for page in first..first + len / PAGE_SIZE {
            if r.is_present(page) {
                continue;
            }
            set_bit(&r.deferred, page);
            if set_bit(&r.settled, page) {
                n += 1;
            }
        }
        self.missing.fetch_sub(n, Ordering::AcqRel);
        Ok(n)
    }

    /// Whether the page holding `gpa` was deferred (and is not present).
    pub fn is_deferred(&self, gpa: u64) -> bool {
        let gpa = gpa - gpa % PAGE_SIZE;
        match self.find(gpa, PAGE_SIZE) {
            Ok(r) => {
                let page = (gpa - r.region.guest_base) / PAGE_SIZE;
                get_bit(&r.deferred, page) && !r.is_present(page)
            }
            Err(_) => false,
        }
    }

    /// Whether the 2 MiB block at `gpa` (block aligned) can be placed as one
    /// huge page: inside one region, at a 2 MiB aligned host address.
    pub fn block_placeable(&self, gpa: u64) -> bool {
        self.can_move
            && gpa % BLOCK_SIZE == 0
            && self
                .find(gpa, BLOCK_SIZE)
                .is_ok_and(|r| (r.region.host_addr as u64 + gpa - r.region.guest_base) % BLOCK_SIZE == 0)
    }

    /// Moves slot `slot` of `staging` (a huge page there) into place as the
    /// 2 MiB block at `gpa` (UFFDIO_MOVE: no copy; the guest gets a
    /// PMD-mapped huge page) and wakes whoever waits on it. No page of the
    /// block may be present and every page of the slot must be backed
    /// (written or [`Staging::touch_zero`]): a hole stops the move. On an
    /// error, `Err((moved, e))` tells how many leading bytes moved (they
    /// are present now); the rest are still in the slot.
    pub fn move_block(&self, gpa: u64, staging: &Staging, slot: u64) -> Result<(), (u64, io::Error)> {
        if !self.block_placeable(gpa) {
            return Err((0, invalid(format!("block {gpa:#x} cannot be placed as a huge page"))));
        }
        let src = staging.slot_addr(slot).map_err(|e| (0, e))?;
        let r = self.find(gpa, BLOCK_SIZE).map_err(|e| (0, e))?;
        let first = (gpa - r.region.guest_base) / PAGE_SIZE;
        let dst = r.region.host_addr as u64 + first * PAGE_SIZE;
        let mut arg = UffdioMove { dst, src: src as u64, len: BLOCK_SIZE, mode: 0, moved: 0 };
        // SAFETY: UFFDIO_MOVE on our userfaultfd with a valid, initialised
        // argument; dst is a block of a registered region (checked above),
        // src a slot of the staging mapping this process owns; the kernel
        // moves the pages between the two (both private anonymous) and
        // writes only `arg.moved`.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.uffd, UFFDIO_MOVE(), &mut arg) };
        let err = (rc != 0).then(io::Error::last_os_error);
        let moved = if rc == 0 { BLOCK_SIZE } else { arg.moved.max(0) as u64 / PAGE_SIZE * PAGE_SIZE };
        let mut n = 0;
        for page in first..first + moved / PAGE_SIZE {
            if r.mark(page) {
                n += 1;
            }
        }
        self.missing.fetch_sub(n, Ordering::AcqRel);
        self.counters.installed.fetch_add(moved / PAGE_SIZE, Ordering::Relaxed);
        match err {
            None => Ok(()),
            Some(e) => Err((moved, e)),
        }
    }

    fn find(&self, gpa: u64, len: u64) -> io::Result<&RegionState> {
        if gpa % PAGE_SIZE != 0 || len == 0 || len % PAGE_SIZE != 0 {
            return Err(invalid(format!("range {gpa:#x}+{len:#x} is not page aligned")));
        }
        self.regions
            .iter()
            .find(|r| r.contains(gpa, len))
            .ok_or_else(|| invalid(format!("range {gpa:#x}+{len:#x} is not inside one managed region")))
    }

    /// Pages not installed yet.
    pub fn missing(&self) -> u64 {
        self.missing.load(Ordering::Acquire)
    }

    /// Whether the page holding `gpa` is installed.
    pub fn is_present(&self, gpa: u64) -> bool {
        let gpa = gpa - gpa % PAGE_SIZE;
        match self.find(gpa, PAGE_SIZE) {
            Ok(r) => r.is_present((gpa - r.region.guest_base) / PAGE_SIZE),
            Err(_) => false,
        }
    }

    /// Installs the content of one or more consecutive pages at `gpa`. Pages
    /// already present are left alone (their content is not overwritten).
    pub fn install(&self, gpa: u64, data: &[u8]) -> io::Result<Installed> {
        let r = self.find(gpa, data.len() as u64)?;
        let first = (gpa - r.region.guest_base) / PAGE_SIZE;
        let pages = data.len() as u64 / PAGE_SIZE;
        let mut any = false;
        // Copy page by page so a page another thread installed meanwhile
        // (EEXIST) does not stop the rest.
        for i in 0..pages {
            let page = first + i;
            if r.is_present(page) {
                continue;
            }
            let dst = r.region.host_addr + (page * PAGE_SIZE) as usize;
            let src = &data[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize];
            // SAFETY: `dst` is a page inside a registered region (checked by
            // `find`), `src` is a live page-sized buffer; UFFDIO_COPY copies
            // atomically and fails with EEXIST if the page is already mapped.
            match unsafe { self.uffd.copy(src.as_ptr().cast(), dst as *mut libc::c_void, PAGE_SIZE as usize, true) } {
                Ok(_) => {
                    if r.mark(page) {
                        self.missing.fetch_sub(1, Ordering::AcqRel);
                    }
                    self.counters.installed.fetch_add(1, Ordering::Relaxed);
                    any = true;
                }
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                    if r.mark(page) {
                        self.missing.fetch_sub(1, Ordering::AcqRel);
                    }
                    self.counters.raced.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(uffd_err(e)),
            }
        }
        Ok(if any { Installed::New } else { Installed::AlreadyPresent })
    }

    /// Installs zero pages over `[gpa, gpa+len)` (pages the guest does not use,
    /// or that are known to be zero) without transferring anything.
    pub fn install_zero(&self, gpa: u64, len: u64) -> io::Result<Installed> {
        let r = self.find(gpa, len)?;
        let first = (gpa - r.region.guest_base) / PAGE_SIZE;
        let mut any = false;
        let mut page = first;
        let end = first + len / PAGE_SIZE;
        while page < end {
            if r.is_present(page) {
                page += 1;
                continue;
            }
            // Zero the longest run of missing pages in one ioctl.
            let mut run_end = page + 1;
            while run_end < end && !r.is_present(run_end) {
                run_end += 1;
            }
            let start = r.region.host_addr + (page * PAGE_SIZE) as usize;
            let run_len = ((run_end - page) * PAGE_SIZE) as usize;
            // SAFETY: the run lies inside a registered region (checked by `find`).
            let res = unsafe { self.uffd.zeropage(start as *mut libc::c_void, run_len, true) };
            match res {
                Ok(_) => any = true,
                Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EEXIST => {
                    // Some page in the run raced in; fall back to one page at a time.
                    for p in page..run_end {
                        let a = r.region.host_addr + (p * PAGE_SIZE) as usize;
                        // SAFETY: as above, one page.
                        match unsafe { self.uffd.zeropage(a as *mut libc::c_void, PAGE_SIZE as usize, true) } {
                            Ok(_) => any = true,
                            Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                                self.counters.raced.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => return Err(uffd_err(e)),
                        }
                    }
                }
                Err(e) => return Err(uffd_err(e)),
            }
            for p in page..run_end {
                if r.mark(p) {
                    self.missing.fetch_sub(1, Ordering::AcqRel);
                    self.counters.zeroed.fetch_add(1, Ordering::Relaxed);
                }
            }
            page = run_end;
        }
        Ok(if any { Installed::New } else { Installed::AlreadyPresent })
    }

    /// Waits up to `timeout` for a page fault and returns the faulting page's
    /// guest-physical address. A fault on a page that is already present (it
    /// was installed between the fault and now) is resolved here by waking
    /// the waiter, and not returned.
    pub fn wait_fault(&self, timeout: Duration) -> io::Result<Option<u64>> {
        let mut pfd = libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(None) } else { Err(e) };
        }
        if n == 0 {
            return Ok(None);
        }
        loop {
            match self.uffd.read_event().map_err(uffd_err)? {
                None => return Ok(None),
                Some(Event::Pagefault { addr, .. }) => {
                    self.counters.faults.fetch_add(1, Ordering::Relaxed);
                    let host = addr as usize;
                    let Some(r) = self
                        .regions
                        .iter()
                        .find(|r| host >= r.region.host_addr && host < r.region.host_addr + r.region.len)
                    else {
                        log::warn!("pager: fault at unmanaged host address {host:#x}");
                        continue;
                    };
                    let off = (host - r.region.host_addr) as u64 / PAGE_SIZE * PAGE_SIZE;
                    let gpa = r.region.guest_base + off;
                    if r.is_present(off / PAGE_SIZE) {
                        let page = (r.region.host_addr as u64 + off) as *mut libc::c_void;
                        self.uffd.wake(page, PAGE_SIZE as usize).map_err(uffd_err)?;
                        continue;
                    }
                    return Ok(Some(gpa));
                }
                Some(other) => log::debug!("pager: ignoring userfaultfd event {other:?}"),
            }
        }
    }

    /// Unregisters every region (all pages present, or the operator gave up):
    /// later accesses to missing pages then read zeros instead of blocking.
    pub fn unregister(&self) -> io::Result<()> {
        for r in &self.regions {
            self.uffd.unregister(r.region.host_addr as *mut libc::c_void, r.region.len).map_err(uffd_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    /// An anonymous private mapping, unmapped on drop.
    pub(crate) struct Mapping {
        addr: usize,
        len: usize,
    }
    impl Mapping {
        fn new(len: usize) -> Self {
            // SAFETY: a fresh anonymous mapping; checked for MAP_FAILED.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Self { addr: p as usize, len }
        }
        pub(crate) fn read_u64(&self, off: usize) -> u64 {
            assert!(off + 8 <= self.len);
            // SAFETY: in bounds of the live mapping; may block on a userfault.
            unsafe { std::ptr::read_volatile((self.addr + off) as *const u64) }
        }
    }
    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmapping what `new` mapped.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }

    pub(crate) const BASE: u64 = 0x1_0000_0000;

    pub(crate) fn pattern(gpa: u64) -> u64 {
        gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
    }

    pub(crate) struct Pattern;
    impl PageSource for Pattern {
        fn answer(&mut self, gpa: u64, buf: &mut [u8]) -> io::Result<Answer> {
            fill(gpa, buf);
            Ok(Answer::Data)
        }
        fn done(&self) -> bool {
            false
        }
    }

    pub(crate) fn fill(gpa: u64, buf: &mut [u8]) {
        for (i, w) in buf.chunks_mut(8).enumerate() {
            w.copy_from_slice(&pattern(gpa + i as u64 * 8).to_le_bytes());
        }
    }

    pub(crate) fn page_of(gpa: u64) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE as usize];
        fill(gpa, &mut b);
        b
    }

    fn serve_pattern(pager: &Pager) {
        serve(pager, &mut Pattern, &Latencies::default(), faults::Options::default()).unwrap();
    }

    pub(crate) fn setup(pages: usize) -> (Arc<Mapping>, Arc<Pager>) {
        let m = Arc::new(Mapping::new(pages * PAGE_SIZE as usize));
        // SAFETY: `m` is a private anonymous mapping kept alive by the test.
        let p = unsafe { Pager::register(&[Region { guest_base: BASE, host_addr: m.addr, len: m.len }]) }.unwrap();
        (m, Arc::new(p))
    }

    #[test]
    fn demand_faults_are_served_with_the_right_content() {
        let (m, pager) = setup(64);
        let reader = {
            let m = m.clone();
            std::thread::spawn(move || (0..64).map(|p| m.read_u64(p * 4096 + 8)).collect::<Vec<_>>())
        };
        serve_pattern(&pager);
        let got = reader.join().unwrap();
        for (p, v) in got.iter().enumerate() {
            assert_eq!(*v, pattern(BASE + p as u64 * 4096 + 8));
        }
        assert_eq!(pager.missing(), 0);
        assert_eq!(pager.counters.faults.load(Ordering::Relaxed), 64);
        pager.unregister().unwrap();
    }

    #[test]
    fn pushed_pages_never_fault() {
        let (m, pager) = setup(32);
        for p in 0..32u64 {
            assert_eq!(pager.install(BASE + p * 4096, &page_of(BASE + p * 4096)).unwrap(), Installed::New);
        }
        assert_eq!(pager.install(BASE, &page_of(BASE)).unwrap(), Installed::AlreadyPresent);
        for p in 0..32 {
            assert_eq!(m.read_u64(p * 4096), pattern(BASE + p as u64 * 4096));
        }
        assert_eq!(pager.counters.faults.load(Ordering::Relaxed), 0);
        assert!(pager.is_present(BASE + 5 * 4096 + 17));
    }

    #[test]
    fn zero_runs_read_as_zero_and_skip_present_pages() {
        let (m, pager) = setup(16);
        pager.install(BASE + 4 * 4096, &page_of(BASE + 4 * 4096)).unwrap();
        assert_eq!(pager.install_zero(BASE, 16 * 4096).unwrap(), Installed::New);
        assert_eq!(pager.missing(), 0);
        assert_eq!(m.read_u64(0), 0);
        assert_eq!(m.read_u64(15 * 4096), 0);
        assert_eq!(m.read_u64(4 * 4096), pattern(BASE + 4 * 4096), "zeroing must not clobber a present page");
        assert_eq!(pager.counters.zeroed.load(Ordering::Relaxed), 15);
    }

    #[test]
    fn push_and_demand_race_without_losing_a_page() {
        let pages = 512u64;
        let (m, pager) = setup(pages as usize);
        let pusher = {
            let pager = pager.clone();
            std::thread::spawn(move || {
                for p in 0..pages {
                    pager.install(BASE + p * 4096, &page_of(BASE + p * 4096)).unwrap();
                }
            })
        };
        let readers: Vec<_> = (0..2)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let order: Vec<u64> = if t == 0 {
                        (0..pages).rev().collect()
                    } else {
                        (0..pages).map(|i| (i * 97) % pages).collect()
                    };
                    for p in order {
                        assert_eq!(m.read_u64(p as usize * 4096 + 64), pattern(BASE + p * 4096 + 64), "page {p}");
                    }
                })
            })
            .collect();
        serve_pattern(&pager);
        pusher.join().unwrap();
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(pager.missing(), 0);
    }

    #[test]
    fn bad_ranges_are_refused() {
        let (_m, pager) = setup(4);
        let page = vec![0u8; 4096];
        assert!(pager.install(BASE + 1, &page).is_err());
        assert!(pager.install(BASE - 4096, &page).is_err());
        assert!(pager.install(BASE + 4 * 4096, &page).is_err());
        assert!(pager.install(BASE, &page[..100]).is_err());
        assert!(pager.install_zero(BASE + 2 * 4096, 3 * 4096).is_err());
        assert!(pager.install_zero(u64::MAX - 4095, 4096).is_err());
        assert_eq!(pager.missing(), 4);
        // SAFETY: not a real mapping, but registration must fail before use.
        let bad = unsafe { Pager::register(&[Region { guest_base: 0, host_addr: 12345, len: 4096 }]) };
        assert!(bad.is_err());
    }
}
