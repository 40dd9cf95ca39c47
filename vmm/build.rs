//! Builds the freestanding testbed guest (`../testbed-guest`, its own Cargo
//! workspace with panic=abort and a linker script) and exposes the ELF's path
//! as `TESTBED_GUEST_ELF` so that `vmm` embeds it with `include_bytes!`.
//!
//! The nested cargo runs with a scrubbed environment: the outer build's
//! RUSTFLAGS, target, wrappers (clippy-driver) and jobserver must not leak
//! into the guest build.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn watch(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            if name == "target" {
                continue;
            }
            if p.is_dir() {
                watch(&p);
            } else {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let guest = root.join("testbed-guest");
    for dep in ["testbed-guest", "testbed-abi", "testbed-workloads", "bitmap-abi"] {
        watch(&root.join(dep));
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("testbed-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&guest);
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let keep = k == "CARGO_HOME" || k == "CARGO_NET_OFFLINE" || k == "CARGO_REGISTRIES_CRATES_IO_PROTOCOL";
        if (k.starts_with("CARGO_") && !keep)
            || k.starts_with("RUSTC")
            || k.starts_with("RUSTDOC")
            || k == "RUSTFLAGS"
            || k == "MAKEFLAGS"
            || k == "MFLAGS"
            || k == "CLIPPY_ARGS"
            || k == "DEBUG"
            || k == "OPT_LEVEL"
            || k == "PROFILE"
            || k == "TARGET"
            || k == "HOST"
            || k == "NUM_JOBS"
            || k == "OUT_DIR"
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd.status().expect("failed to run cargo for the testbed guest");
    if !status.success() {
        panic!("building the testbed guest failed (cargo build --release --manifest-path testbed-guest/Cargo.toml)");
    }
    let elf = target_dir.join("release").join("testbed-guest");
    if !elf.exists() {
        panic!("testbed guest ELF not found at {}", elf.display());
    }
    println!("cargo:rustc-env=TESTBED_GUEST_ELF={}", elf.display());
}
