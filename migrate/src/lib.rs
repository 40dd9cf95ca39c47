//! Migration engine: stop-and-copy, pre-copy, post-copy and enlightened
//! post-copy (thesis 002, chapter 5).
//!
//! - [`wire`]: the authenticated, framed protocol between source and destination.
//! - [`space`]: guest RAM as a page index space, page bitmaps, content
//!   digests (the integrity check) and frame ranges.

pub mod space;
pub mod wire;
