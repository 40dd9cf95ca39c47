//! Testbed workloads (no_std), shared by the testbed guest and host benchmarks.
#![no_std]
