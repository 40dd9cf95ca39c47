//! The streamed disk: a local sparse overlay file in front of the
//! appliance's disk chunks, for a virtio-blk backend.
//!
//! A read waits until every chunk it covers is local (fetched through the
//! session, so it is traced and drives streaming; zero chunks cost no
//! fetch). Writes go to the overlay only; a write that covers part of a
//! missing chunk fetches that chunk first, one that covers whole chunks
//! needs no fetch. Concurrent requests for one missing chunk fetch it once.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use crate::chunk::{ChunkKey, CHUNK_SIZE};
use crate::session::Session;
use crate::{io_err, Error, Result};

const CS: u64 = CHUNK_SIZE as u64;

struct State {
    present: Vec<u64>,
    fetching: HashSet<u64>,
    count: u64,
}

pub struct DiskOverlay {
    session: Arc<Session>,
    file: File,
    size: u64,
    st: Mutex<State>,
    cv: Condvar,
}

impl DiskOverlay {
    /// Creates (truncating) the overlay file for the session's disk.
    pub fn create(session: Arc<Session>, path: &Path) -> Result<Self> {
        let size = session.manifest().disk_size.ok_or_else(|| Error::Invalid("the appliance has no disk".into()))?;
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(io_err(path))?;
        file.set_len(size).map_err(io_err(path))?;
        let n = size.div_ceil(CS);
        Ok(Self {
            session,
            file,
            size,
            st: Mutex::new(State { present: vec![0; n.div_ceil(64) as usize], fetching: HashSet::new(), count: 0 }),
            cv: Condvar::new(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunks held locally (fetched or written).
    pub fn present_chunks(&self) -> u64 {
        self.lock().count
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_present(st: &State, i: u64) -> bool {
        st.present[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn mark(st: &mut State, i: u64) {
        if !Self::is_present(st, i) {
            st.present[(i / 64) as usize] |= 1 << (i % 64);
            st.count += 1;
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::Invalid(format!("disk access {offset:#x}+{len:#x} beyond the disk ({:#x})", self.size))),
        }
    }

    /// Makes chunk `i` local, fetching it unless another request is.
    fn ensure(&self, i: u64) -> Result<()> {
        let mut st = self.lock();
        loop {
            if Self::is_present(&st, i) {
                return Ok(());
            }
            if st.fetching.insert(i) {
                break;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        drop(st);
        let res = (|| -> Result<()> {
            let data = self
                .session
                .read(ChunkKey::Disk(i))?
                .ok_or_else(|| Error::Invalid(format!("disk chunk {i} is outside the appliance")))?;
            let n = (self.size - i * CS).min(CS) as usize;
            if data.iter().any(|&b| b != 0) {
                self.file.write_all_at(&data[..n], i * CS).map_err(io_err("disk overlay"))?;
            }
            Ok(())
        })();
        let mut st = self.lock();
        st.fetching.remove(&i);
        if res.is_ok() {
            Self::mark(&mut st, i);
        }
        self.cv.notify_all();
        res
    }

    /// Reads `buf.len()` bytes at `offset`, waiting for missing chunks.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        for i in offset / CS..=(offset + buf.len() as u64 - 1) / CS {
            self.ensure(i)?;
        }
        self.file.read_exact_at(buf, offset).map_err(io_err("disk overlay"))
    }

    /// Writes `data` at `offset` into the overlay.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let (first, last) = (offset / CS, (end - 1) / CS);
        for i in first..=last {
            let (cs, ce) = (i * CS, ((i + 1) * CS).min(self.size));
            let whole = offset <= cs && end >= ce;
            if !whole {
                self.ensure(i)?;
            }
        }
        self.file.write_all_at(data, offset).map_err(io_err("disk overlay"))?;
        let mut st = self.lock();
        for i in first..=last {
            Self::mark(&mut st, i);
        }
        Ok(())
    }

    /// Flushes the overlay file to stable storage (a guest FLUSH).
    pub fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(io_err("disk overlay"))
    }
}
