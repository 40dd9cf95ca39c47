//! The `disk` and `virtio-garbage` workloads.

use testbed_abi::{BootInfo, WorkloadSpec};
use testbed_workloads::Batch;

pub struct Clock {
    pub ticks_per_sec: u64,
}

pub fn run(_bi: &BootInfo, _spec: &WorkloadSpec, _clock: &Clock) -> Batch {
    crate::fail(format_args!("disk workload not implemented yet"))
}

pub fn garbage(_bi: &BootInfo, _spec: &WorkloadSpec) -> Batch {
    crate::fail(format_args!("virtio-garbage workload not implemented yet"))
}
