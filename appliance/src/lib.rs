//! Virtual appliances for streaming (issue 5, thesis 002 chapter 3: vTube).
//!
//! - [`chunk`]: 4 KiB chunks named by the BLAKE3 hash of their content,
//!   stored lz4-compressed.
//! - [`manifest`]: the versioned, content-hashed description of an
//!   appliance: VM configuration, device state, and the chunk index of every
//!   memory region and of the disk (zero and free chunks are marked, not stored).
//! - [`store`]: the server-side store: chunks (each content once across all
//!   appliances), manifests, appliance names, traces and analysis results.
//! - [`server`] / [`client`]: HTTP/1.1 with immutable content-addressed URLs;
//!   the client keeps a local content-addressed cache and measures bandwidth.
//! - [`trace`]: first-access traces of a session.
//! - [`analysis`]: vTube's clustering analysis (thesis 3.2.2).
//! - [`planner`]: dynamic streaming (equation 3.1, buffer vs stream) and the
//!   baseline orders (VMTorrent profile order, demand only, full download).
//! - [`overlay`]: the streamed disk as a local sparse overlay (virtio-blk backend).
//! - [`session`]: a streaming session, the API `vmm stream`'s memory and
//!   disk fault paths call.
//! - [`sim`]: replays a trace against a link model and reports the metrics of
//!   thesis Table 3.2; [`synth`] makes synthetic but realistic traces.

pub mod analysis;
pub mod chunk;
pub mod client;
mod http;
pub mod manifest;
pub mod overlay;
pub mod planner;
pub mod server;
pub mod session;
pub mod sim;
pub mod store;
pub mod synth;
pub mod trace;

pub use chunk::{ChunkHash, ChunkKey, CHUNK_SIZE};
pub use client::{Cache, Client};
pub use manifest::{ChunkRef, Manifest};
pub use store::Store;

use std::path::PathBuf;

/// Everything that can go wrong, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Net(String),
    #[error("chunk {expected}: content hash mismatch (got {actual}); the chunk is corrupted")]
    HashMismatch { expected: String, actual: String },
    #[error("chunk {0}: {1}")]
    BadChunk(String, String),
    #[error("malformed manifest: {0}")]
    BadManifest(String),
    #[error("{what} format version {found}, this build reads version {supported}")]
    BadVersion { what: &'static str, found: u32, supported: u32 },
    #[error("malformed trace: {0}")]
    BadTrace(String),
    #[error("malformed knowledge file: {0}")]
    BadKnowledge(String),
    #[error("no such {0}")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
