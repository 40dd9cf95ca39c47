//! Migration engine: stop-and-copy, pre-copy, post-copy and enlightened
//! post-copy (thesis 002, chapter 5).
//!
//! - [`wire`]: the authenticated, framed protocol between source and destination.

pub mod wire;
