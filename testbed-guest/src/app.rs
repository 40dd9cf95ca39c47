//! The `app` workload on vCPU 0: fill the appliance's state, wait for a
//! session on the session port (phase `idle`: the moment an appliance is
//! snapshotted), then run the session's steps (`testbed_workloads::app`),
//! verifying every page it reads, and end the VM.

use testbed_abi::{stats_off as so, BootInfo, Phase, Workload, WorkloadSpec, PAGE_SIZE, SESSION_PORT};
use testbed_workloads::app::{AppLayout, AppSession, PAGE_WORDS};
use testbed_workloads::Batch;

use crate::hw::{self, pause, rdtsc, stat32};
use crate::{enlighten, fail, println, share, Clock};

/// Longest session specification read from the port.
const MAX_SESSION: usize = 256;

/// Reads the session specification from the session port into `buf`;
/// returns its length (0: none yet).
fn read_session(buf: &mut [u8; MAX_SESSION]) -> usize {
    hw::outb(SESSION_PORT, 0);
    let mut n = 0;
    while n < buf.len() {
        let b = hw::inb(SESSION_PORT);
        if b == 0 {
            break;
        }
        buf[n] = b;
        n += 1;
    }
    n
}

fn spin_ms(clock: &Clock, ms: u64, enl: &mut Option<enlighten::Enlighten>) {
    let end = rdtsc() + clock.ticks_per_sec / 1000 * ms;
    while rdtsc() < end {
        if let Some(e) = enl {
            e.poll();
        }
        pause();
    }
}

/// Runs the `app` workload (vCPU 0; the others park). Never returns.
pub fn run(bi: &BootInfo, spec: &WorkloadSpec, clock: &Clock, mut enl: Option<enlighten::Enlighten>) -> ! {
    let (base, len) = share(bi, 0, 1);
    let want = spec.app.state.resolve(bi.total_ram()) / PAGE_SIZE * PAGE_SIZE;
    let bytes = want.min(len / PAGE_SIZE * PAGE_SIZE);
    let Some(layout) = AppLayout::new(bytes / PAGE_SIZE, spec.app.features, spec.seed) else {
        fail(format_args!("{} KiB of state cannot hold {} features", bytes >> 10, spec.app.features))
    };
    if let Some(e) = &mut enl {
        e.note(base, bytes, enlighten::Class::UserData);
    }
    // SAFETY: [base, base+bytes) lies in vCPU 0's share of the heap, which
    // is all of it: the other vCPUs park without touching RAM.
    let state = unsafe { hw::ram_words(base, bytes as usize / 8) };
    let page = |p: u64| p as usize * PAGE_WORDS..(p as usize + 1) * PAGE_WORDS;

    // Fill (only on a fresh boot: a restored appliance is past it).
    println!("testbed: app: filling {} MiB of state, {} features", bytes >> 20, layout.features());
    for p in 0..layout.pages() {
        layout.fill_page(p, &mut state[page(p)]);
    }

    // Idle until a session arrives.
    stat32(so::PHASE, Phase::Idle as u32);
    println!("testbed: app: idle, waiting for a session");
    let mut buf = [0u8; MAX_SESSION];
    let n = loop {
        let n = read_session(&mut buf);
        if n != 0 {
            break n;
        }
        spin_ms(clock, 10, &mut enl);
    };
    let text = core::str::from_utf8(&buf[..n]).unwrap_or("");
    let session = match WorkloadSpec::parse(text) {
        Ok(s) if s.workload == Workload::App => s,
        Ok(_) => fail(format_args!("session `{text}` is not an app session")),
        Err(e) => fail(format_args!("session `{text}`: {e}")),
    };
    println!(
        "testbed: app: session seed={} steps={} think={} ms flow={}%",
        session.seed, session.app.steps, session.app.think_ms, session.app.flow_pct
    );
    crate::start_run_phase();

    let mut total = Batch::default();
    let open = |(first, count): (u64, u64), total: &mut Batch| {
        for p in first..first + count {
            let b = layout.read_page(p, &state[page(p)]);
            total.ops += b.ops;
            total.errors += b.errors;
            total.checksum ^= b.checksum;
        }
        crate::heartbeat(total.ops, total.errors);
    };
    open(layout.core(), &mut total);
    let mut s = AppSession::new(&layout, session.app.steps, session.app.flow_pct, session.seed);
    while let Some(f) = s.next_feature() {
        spin_ms(clock, session.app.think_ms as u64, &mut enl);
        open(layout.feature(f), &mut total);
    }
    if total.errors != 0 {
        println!("testbed: app: {} pages read wrong", total.errors);
    }
    crate::finish_single(total, clock)
}
