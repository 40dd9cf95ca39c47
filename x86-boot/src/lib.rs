//! x86-64 boot setup (see Cargo.toml description).
