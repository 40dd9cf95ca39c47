//! The testbed workload specification: `WORKLOAD[,key=value...]`.
//!
//! Parsed by the VMM (to reject bad input before booting) and again by the
//! guest from its boot info command line, with this same code.
//!
//! | workload | keys |
//! |---|---|
//! | `mem`  | `wss=SIZE|PCT%` working set (default 50%), `rate=PAGES` pages dirtied per second (0 = as fast as possible, default) |
//! | `kv`   | `share=PCT` of RAM filled (default 50), `value=BYTES` value size (default 1024), `ratio=SET:GET` (default 1:9), `theta=F` Zipf skew (default 0.99) |
//! | `disk` | `size=SIZE` bytes of disk exercised (default 16M, capped at the disk size), `block=SIZE` request size (default 4096) |
//! | `app`  | `state=SIZE|PCT%` state filled at boot (default 25%), `features=N` regions in it (default 32); per session: `steps=N` features opened (default 8), `think=MS` pause between them (default 200), `flow=PCT` chance of following the usual workflow to the next feature (default 70) |
//! | `mcd`  | a memcached server on the VM's virtio-net device: `ip=A.B.C.D/PREFIX` (default 10.0.9.15/24), `port=N` (11211), `share=PCT` of RAM for the store (default 25), `value=BYTES` largest value (4096), `fill=PCT` of the store's slots preloaded with `max`-sized values before the run phase, like a warm cache (default 0) |
//! | `virtio-garbage` | no keys; a test workload that writes garbage to virtio registers, descriptors and rings |
//! | `fault` | no keys; a test workload that executes `ud2` with no IDT, i.e. triple-faults the VM |
//!
//! Common keys: `duration=SECONDS` (run phase length; 0 = until stopped, the
//! default), `seed=N` (default 1).

use core::fmt;

/// The workload kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Workload {
    Mem = 1,
    Kv = 2,
    Disk = 3,
    VirtioGarbage = 4,
    /// Test workload: triple-faults (ud2 at CPL3 with no IDT).
    Fault = 5,
    /// An appliance's user session over a large prefilled state (streaming).
    App = 6,
    /// A memcached server on the VM's virtio-net device (TCP/IP by smoltcp).
    Mcd = 7,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::Mem,
        Workload::Kv,
        Workload::Disk,
        Workload::VirtioGarbage,
        Workload::Fault,
        Workload::App,
        Workload::Mcd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Mem => "mem",
            Self::Kv => "kv",
            Self::Disk => "disk",
            Self::VirtioGarbage => "virtio-garbage",
            Self::Fault => "fault",
            Self::App => "app",
            Self::Mcd => "mcd",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|w| w.name() == s)
    }

    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|w| *w as u32 == v)
    }

    /// Whether the workload needs a virtio-blk disk.
    pub fn needs_disk(self) -> bool {
        matches!(self, Self::Disk | Self::VirtioGarbage)
    }

    /// Whether the workload needs a virtio-net device.
    pub fn needs_net(self) -> bool {
        matches!(self, Self::Mcd)
    }
}

/// A size that is either absolute or a share of RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeOrPercent {
    Bytes(u64),
    Percent(u32),
}

impl SizeOrPercent {
    /// Resolves against the total RAM size.
    pub fn resolve(self, total: u64) -> u64 {
        match self {
            Self::Bytes(b) => b,
            Self::Percent(p) => total / 100 * p as u64,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemParams {
    pub wss: SizeOrPercent,
    /// Pages dirtied per second; 0 = unlimited.
    pub rate: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvParams {
    /// Percent of guest RAM filled with the store.
    pub share_pct: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// SET:GET ratio.
    pub sets: u32,
    pub gets: u32,
    /// Zipf skew in thousandths (990 = 0.99).
    pub theta_milli: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskParams {
    /// Bytes of the disk the workload exercises.
    pub size: u64,
    /// Request size in bytes (a multiple of 512).
    pub block: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppParams {
    /// State filled at boot.
    pub state: SizeOrPercent,
    /// Feature regions in the state.
    pub features: u32,
    /// Features a session opens after the core.
    pub steps: u32,
    /// Pause between features, ms.
    pub think_ms: u32,
    /// Percent chance that the next feature is the current one's usual successor.
    pub flow_pct: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McdParams {
    /// The guest's IPv4 address and prefix length.
    pub ip: [u8; 4],
    pub prefix: u8,
    pub port: u16,
    /// Percent of guest RAM for the store.
    pub share_pct: u32,
    /// Largest value in bytes.
    pub max_value: u32,
    /// Percent of the store's slots preloaded (keys `fill:N`, values of
    /// `max_value` bytes) before the run phase.
    pub fill_pct: u32,
}

/// A parsed workload specification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub workload: Workload,
    /// Run-phase duration in seconds; 0 = until stopped.
    pub duration_s: u64,
    pub seed: u64,
    pub mem: MemParams,
    pub kv: KvParams,
    pub disk: DiskParams,
    pub app: AppParams,
    pub mcd: McdParams,
    /// Percent of RAM that memory workloads fill with stale data before they
    /// start and then leave unused: memory a real OS would hold as free pages
    /// with old content (freed buffers, evicted caches). Not zero, yet free.
    pub stale_pct: u32,
    /// Memory workloads end after this many run-phase operations (all vCPUs
    /// together; 0 = no limit). Unlike `duration`, this holds across a
    /// snapshot that is restored much later (the guest's clock runs on).
    pub ops_limit: u64,
}

/// Why a workload specification was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecError<'a> {
    Empty,
    UnknownWorkload(&'a str),
    UnknownKey { workload: &'static str, key: &'a str },
    MissingValue(&'a str),
    BadValue { key: &'a str, value: &'a str, expected: &'static str },
}

impl fmt::Display for SpecError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "empty workload specification; expected one of mem, kv, disk, app, mcd"),
            Self::UnknownWorkload(w) => {
                write!(
                    f,
                    "unknown workload `{w}`; expected one of mem, kv, disk, app, mcd (test-only: virtio-garbage, fault)"
                )
            }
            Self::UnknownKey { workload, key } => {
                write!(f, "unknown key `{key}` for workload `{workload}`; valid keys: {}", valid_keys(workload))
            }
            Self::MissingValue(k) => write!(f, "key `{k}` needs a value (`{k}=...`)"),
            Self::BadValue { key, value, expected } => {
                write!(f, "bad value `{value}` for `{key}`: expected {expected}")
            }
        }
    }
}

fn valid_keys(workload: &str) -> &'static str {
    match workload {
        "mem" => "duration, seed, wss, rate",
        "kv" => "duration, seed, share, value, ratio, theta",
        "disk" => "duration, seed, size, block",
        "app" => "duration, seed, state, features, steps, think, flow",
        "mcd" => "duration, seed, ip, port, share, value, fill",
        _ => "duration, seed",
    }
}

/// Parses a size: a number with an optional K, M, G or T suffix (binary
/// multiples, an optional trailing `B` or `iB` is accepted).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_suffix("iB").or_else(|| s.strip_suffix('B')).unwrap_or(s);
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n = parse_u64(digits)?;
    n.checked_mul(1u64 << shift)
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut n: u64 = 0;
    for b in s.bytes() {
        n = n.checked_mul(10)?.checked_add((b - b'0') as u64)?;
    }
    Some(n)
}

/// Parses `PCT%` (1 to `max_pct`) or a size of at least `min_bytes`.
fn parse_size_or_percent(s: &str, max_pct: u64, min_bytes: u64) -> Option<SizeOrPercent> {
    match s.strip_suffix('%') {
        Some(p) => parse_u64(p).filter(|p| (1..=max_pct).contains(p)).map(|p| SizeOrPercent::Percent(p as u32)),
        None => parse_size(s).filter(|&b| b >= min_bytes).map(SizeOrPercent::Bytes),
    }
}

/// Parses a decimal fraction like `0.99` into thousandths.
fn parse_milli(s: &str) -> Option<u32> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    let int = if int.is_empty() { 0 } else { parse_u64(int)? };
    if frac.len() > 3 || (!frac.is_empty() && !frac.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let mut f = 0u64;
    for i in 0..3 {
        f = f * 10 + frac.as_bytes().get(i).map(|b| (b - b'0') as u64).unwrap_or(0);
    }
    u32::try_from(int.checked_mul(1000)?.checked_add(f)?).ok()
}

impl WorkloadSpec {
    /// Default parameters for a workload.
    pub fn defaults(workload: Workload) -> Self {
        Self {
            workload,
            duration_s: 0,
            seed: 1,
            mem: MemParams { wss: SizeOrPercent::Percent(50), rate: 0 },
            kv: KvParams { share_pct: 50, value_size: 1024, sets: 1, gets: 9, theta_milli: 990 },
            disk: DiskParams { size: 16 << 20, block: 4096 },
            app: AppParams { state: SizeOrPercent::Percent(25), features: 32, steps: 8, think_ms: 200, flow_pct: 70 },
            mcd: McdParams { ip: [10, 0, 9, 15], prefix: 24, port: 11211, share_pct: 25, max_value: 4096, fill_pct: 0 },
            stale_pct: 0,
            ops_limit: 0,
        }
    }

    /// Parses `WORKLOAD[,key=value...]`.
    pub fn parse(s: &str) -> Result<Self, SpecError<'_>> {
        let s = s.trim();
        let mut parts = s.split(',');
        let name = parts.next().map(str::trim).unwrap_or("");
        if name.is_empty() {
            return Err(SpecError::Empty);
        }
        let workload = Workload::from_name(name).ok_or(SpecError::UnknownWorkload(name))?;
        let mut spec = Self::defaults(workload);
        for part in parts {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (key, value) = part.split_once('=').ok_or(SpecError::MissingValue(part))?;
            let (key, value) = (key.trim(), value.trim());
            let bad = |expected| SpecError::BadValue { key, value, expected };
            match (workload, key) {
                (_, "duration") => spec.duration_s = parse_u64(value).ok_or(bad("whole seconds"))?,
                (_, "seed") => spec.seed = parse_u64(value).ok_or(bad("an integer"))?,
                (Workload::Mem, "wss") => {
                    spec.mem.wss = parse_size_or_percent(value, 100, 4096)
                        .ok_or(bad("a size like 256M or a percentage 1%..100%"))?
                }
                (Workload::Mem, "rate") => spec.mem.rate = parse_u64(value).ok_or(bad("pages per second"))?,
                (Workload::Kv | Workload::Mem, "ops") => {
                    spec.ops_limit = parse_size(value).ok_or(bad("a number of operations, e.g. 500000 or 2M"))?
                }
                (Workload::Kv | Workload::Mem, "stale") => match parse_u64(value.trim_end_matches('%')) {
                    Some(p @ 0..=90) => spec.stale_pct = p as u32,
                    _ => return Err(bad("a percentage of RAM from 0 to 90")),
                },
                (Workload::Kv, "share") => match parse_u64(value.trim_end_matches('%')) {
                    Some(p @ 1..=90) => spec.kv.share_pct = p as u32,
                    _ => return Err(bad("a percentage of RAM from 1 to 90")),
                },
                (Workload::Kv, "value") => match parse_size(value) {
                    Some(v @ 16..=65536) => spec.kv.value_size = v as u32,
                    _ => return Err(bad("a value size from 16 to 65536 bytes")),
                },
                (Workload::Kv, "ratio") => {
                    let parsed = value.split_once(':').and_then(|(a, b)| Some((parse_u64(a)?, parse_u64(b)?)));
                    match parsed {
                        Some((a, b)) if a + b > 0 && a <= 1000 && b <= 1000 => {
                            spec.kv.sets = a as u32;
                            spec.kv.gets = b as u32;
                        }
                        _ => return Err(bad("SET:GET, e.g. 1:9")),
                    }
                }
                (Workload::Kv, "theta") => match parse_milli(value) {
                    Some(t) if t < 1000 => spec.kv.theta_milli = t,
                    _ => return Err(bad("a Zipf skew in [0, 1), e.g. 0.99")),
                },
                (Workload::App, "state") => {
                    spec.app.state = parse_size_or_percent(value, 90, 1 << 20)
                        .ok_or(bad("a size of at least 1M or a percentage 1%..90%"))?
                }
                (Workload::App, "features") => match parse_u64(value) {
                    Some(n @ 1..=4096) => spec.app.features = n as u32,
                    _ => return Err(bad("a number of features from 1 to 4096")),
                },
                (Workload::App, "steps") => match parse_u64(value) {
                    Some(n @ 0..=100_000) => spec.app.steps = n as u32,
                    _ => return Err(bad("a number of steps up to 100000")),
                },
                (Workload::App, "flow") => match parse_u64(value.trim_end_matches('%')) {
                    Some(p @ 0..=100) => spec.app.flow_pct = p as u32,
                    _ => return Err(bad("a percentage from 0 to 100")),
                },
                (Workload::App, "think") => match parse_u64(value) {
                    Some(n @ 0..=600_000) => spec.app.think_ms = n as u32,
                    _ => return Err(bad("milliseconds up to 600000")),
                },
                (Workload::Disk, "size") => match parse_size(value) {
                    Some(b) if b >= 4096 && b % 512 == 0 => spec.disk.size = b,
                    _ => return Err(bad("a size of at least 4K, a multiple of 512")),
                },
                (Workload::Mcd, "ip") => {
                    let parsed = value.split_once('/').map_or(Some((value, 24)), |(a, p)| Some((a, parse_u64(p)?)));
                    let ip = parsed.and_then(|(a, p)| {
                        let mut ip = [0u8; 4];
                        let mut parts = a.split('.');
                        for b in ip.iter_mut() {
                            *b = u8::try_from(parse_u64(parts.next()?)?).ok()?;
                        }
                        (parts.next().is_none() && (8..=30).contains(&p)).then_some((ip, p as u8))
                    });
                    match ip {
                        Some((ip, p)) => (spec.mcd.ip, spec.mcd.prefix) = (ip, p),
                        None => return Err(bad("an IPv4 address with an optional prefix, e.g. 10.0.9.15/24")),
                    }
                }
                (Workload::Mcd, "port") => match parse_u64(value) {
                    Some(p @ 1..=65535) => spec.mcd.port = p as u16,
                    _ => return Err(bad("a TCP port")),
                },
                (Workload::Mcd, "share") => match parse_u64(value.trim_end_matches('%')) {
                    Some(p @ 1..=80) => spec.mcd.share_pct = p as u32,
                    _ => return Err(bad("a percentage of RAM from 1 to 80")),
                },
                (Workload::Mcd, "value") => match parse_size(value) {
                    Some(v @ 16..=4096) => spec.mcd.max_value = v as u32,
                    _ => return Err(bad("a largest value size from 16 to 4096 bytes")),
                },
                (Workload::Mcd, "fill") => match parse_u64(value.trim_end_matches('%')) {
                    Some(p @ 0..=90) => spec.mcd.fill_pct = p as u32,
                    _ => return Err(bad("a percentage of the store's slots from 0 to 90")),
                },
                (Workload::Disk, "block") => match parse_size(value) {
                    Some(b @ 512..=1048576) if b % 512 == 0 => spec.disk.block = b as u32,
                    _ => return Err(bad("a multiple of 512 from 512 to 1M")),
                },
                _ => return Err(SpecError::UnknownKey { workload: workload.name(), key }),
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcd() {
        let s = WorkloadSpec::parse("mcd,ip=192.168.7.2/16,port=9000,share=10").unwrap();
        assert_eq!((s.mcd.ip, s.mcd.prefix, s.mcd.port, s.mcd.share_pct), ([192, 168, 7, 2], 16, 9000, 10));
        assert_eq!(WorkloadSpec::parse("mcd,ip=10.0.0.1").unwrap().mcd.prefix, 24);
        assert_eq!(WorkloadSpec::parse("mcd,fill=60%").unwrap().mcd.fill_pct, 60);
        assert!(WorkloadSpec::parse("mcd,fill=95").is_err());
        for bad in ["mcd,ip=10.0.0", "mcd,ip=10.0.0.256", "mcd,ip=10.0.0.1/31", "mcd,ip=10.0.0.1.2", "mcd,port=0"] {
            assert!(WorkloadSpec::parse(bad).is_err(), "{bad}");
        }
        assert!(Workload::Mcd.needs_net());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("512MB"), Some(512 << 20));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999999999999T"), None);
    }

    #[test]
    fn parse_defaults_and_keys() {
        let s = WorkloadSpec::parse("kv,duration=5").unwrap();
        assert_eq!(s.workload, Workload::Kv);
        assert_eq!(s.duration_s, 5);
        assert_eq!((s.kv.sets, s.kv.gets), (1, 9));
        assert_eq!(s.kv.theta_milli, 990);
        let s = WorkloadSpec::parse("kv,share=30,value=4K,ratio=1:1,theta=0.5,seed=7").unwrap();
        assert_eq!(s.kv.share_pct, 30);
        let o = WorkloadSpec::parse("kv,ops=2M,stale=40").unwrap();
        assert_eq!((o.ops_limit, o.stale_pct), (2 << 20, 40));
        assert!(WorkloadSpec::parse("kv,stale=95").is_err());
        assert!(WorkloadSpec::parse("disk,ops=5").is_err());
        assert_eq!(s.kv.value_size, 4096);
        assert_eq!((s.kv.sets, s.kv.gets), (1, 1));
        assert_eq!(s.kv.theta_milli, 500);
        assert_eq!(s.seed, 7);
        let s = WorkloadSpec::parse("mem,wss=25%,rate=1000").unwrap();
        assert_eq!(s.mem.wss, SizeOrPercent::Percent(25));
        assert_eq!(s.mem.rate, 1000);
        assert_eq!(s.mem.wss.resolve(1 << 30), (1 << 30) / 100 * 25);
        let s = WorkloadSpec::parse("disk,size=8M,block=64K").unwrap();
        assert_eq!(s.disk.size, 8 << 20);
        assert_eq!(s.disk.block, 65536);
        let s = WorkloadSpec::parse("app,state=320M,features=48,steps=12,think=0,seed=3").unwrap();
        assert_eq!(s.workload, Workload::App);
        assert_eq!(
            s.app,
            AppParams { state: SizeOrPercent::Bytes(320 << 20), features: 48, steps: 12, think_ms: 0, flow_pct: 70 }
        );
        assert_eq!(WorkloadSpec::parse("app,flow=40").unwrap().app.flow_pct, 40);
        assert!(WorkloadSpec::parse("app,flow=101").is_err());
        assert_eq!(WorkloadSpec::parse("app").unwrap().app.state, SizeOrPercent::Percent(25));
        assert!(WorkloadSpec::parse("app,features=0").is_err());
        assert!(WorkloadSpec::parse("app,state=4K").is_err());
        assert!(WorkloadSpec::parse("app,share=5").is_err());
    }

    #[test]
    fn parse_errors() {
        assert_eq!(WorkloadSpec::parse(""), Err(SpecError::Empty));
        assert_eq!(WorkloadSpec::parse("nope"), Err(SpecError::UnknownWorkload("nope")));
        assert_eq!(WorkloadSpec::parse("kv,wss=1G"), Err(SpecError::UnknownKey { workload: "kv", key: "wss" }));
        assert_eq!(WorkloadSpec::parse("kv,duration"), Err(SpecError::MissingValue("duration")));
        assert!(matches!(WorkloadSpec::parse("kv,duration=abc"), Err(SpecError::BadValue { .. })));
        assert!(matches!(WorkloadSpec::parse("kv,share=95"), Err(SpecError::BadValue { .. })));
        assert!(matches!(WorkloadSpec::parse("kv,theta=1.5"), Err(SpecError::BadValue { .. })));
        assert!(matches!(WorkloadSpec::parse("kv,ratio=0:0"), Err(SpecError::BadValue { .. })));
        assert!(matches!(WorkloadSpec::parse("disk,block=100"), Err(SpecError::BadValue { .. })));
        assert!(matches!(WorkloadSpec::parse("mem,wss=0%"), Err(SpecError::BadValue { .. })));
        let msg = std::format!("{}", WorkloadSpec::parse("kv,foo=1").unwrap_err());
        assert!(msg.contains("foo") && msg.contains("valid keys"), "{msg}");
    }
}
