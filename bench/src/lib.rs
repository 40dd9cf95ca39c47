//! Benchmark harnesses shared by the `bench` binaries.

pub mod contention;
pub mod flowtap;
pub mod host_memory;
pub mod memslap;
pub mod migration;
pub mod qemu;

/// The median of `v` (sorted in place; the mean of the middle two for an
/// even count). `v` must not be empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Writes a migration key file as `vmm keygen` would (mode 0600), replacing one.
pub fn write_key(path: &std::path::Path, secret: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?.write_all(secret)
}
