//! Migration engine: stop-and-copy, pre-copy, post-copy and enlightened
//! post-copy (thesis 002, chapter 5).
//!
//! - [`wire`]: the authenticated, framed protocol between source and destination.
//! - [`space`]: guest RAM as a page index space, page bitmaps, content
//!   digests (the integrity check) and frame ranges.
//! - [`vm`]: what the engine needs from a VM ([`vm::MigratableVm`]).
//! - [`policy`]: what to send next (pre-copy convergence, post-copy rounds).
//! - [`source`] and [`receive`]: a migration's two ends, in every mode.
//! - [`push`] and [`dest`]: post-copy's two ends after the switch-over
//!   (push rounds and the demand server; the userfaultfd pager, its fault
//!   loop's page source and the installers).
//! - [`progress`]: the migration a VM is in, its phase and cancellation.
//! - [`transport`]: tokens, the interactive demand lane, byte counting.
//! - [`error`]: the engine's typed errors.

pub mod blocks;
pub mod dest;
pub mod error;
pub mod policy;
pub mod progress;
pub mod push;
pub mod receive;
pub mod report;
pub mod source;
pub mod space;
pub mod transport;
pub mod vm;
pub mod wire;

pub use error::{Error, Result};

/// Pages per pushed `Pages` frame (1 MiB).
pub const PUSH_BATCH: usize = 256;
/// Most pages one `Request` frame asks for.
pub const MAX_REQUEST: usize = 64;
