//! The server-side store.
//!
//! ```text
//! DIR/chunks/ab/cdef…          encoded chunk, named by the hash of its content
//! DIR/manifests/<hash>         manifest bytes, named by their hash
//! DIR/appliances/NAME/manifest hex hash of the current manifest
//! DIR/appliances/NAME/traces/<hash>.trace
//! DIR/appliances/NAME/knowledge/<version, 8 digits>.json
//! ```
//! Every file is written to a temporary name in its directory and renamed,
//! so a reader (the server, a concurrent writer, a crash) never sees a
//! partial file. Chunk contents are stored once across all appliances.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::chunk::{self, ChunkHash, CHUNK_SIZE};
use crate::manifest::{ChunkRef, Manifest, ManifestBuilder};
use crate::{io_err, Error, Result};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `data` to `path` atomically (temporary file in the same directory, then rename).
pub fn atomic_write(path: &Path, data: &[u8], sync: bool) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed),
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    let res = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        if sync {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io { path: path.to_owned(), source: e });
    }
    Ok(())
}

/// Appliance, file and directory names: `[A-Za-z0-9._-]`, 1 to 64 characters, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn check_name(name: &str) -> Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(Error::Invalid(format!("appliance name `{name}`: use 1-64 of [A-Za-z0-9._-], not starting with '.'")))
    }
}

/// One guest memory region to put into an appliance.
pub struct MemorySource<'a> {
    pub gpa: u64,
    pub size: u64,
    /// Exactly `size` bytes of the region's content.
    pub data: Box<dyn Read + 'a>,
}

/// What [`Store::create_appliance`] did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CreateReport {
    pub manifest: String,
    pub manifest_bytes: u64,
    pub mem_chunks: u64,
    pub disk_chunks: u64,
    pub zero_chunks: u64,
    pub free_chunks: u64,
    pub data_chunks: u64,
    /// Chunks written (content new to the store).
    pub new_chunks: u64,
    /// Data chunks whose content the store already had.
    pub dedup_chunks: u64,
    /// Bytes of non-zero, non-free state hashed.
    pub input_bytes: u64,
    /// Encoded bytes written for new chunks.
    pub stored_bytes: u64,
    pub seconds: f64,
}

/// A directory holding chunks, manifests, traces and knowledge.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) a store.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for d in ["chunks", "manifests", "appliances"] {
            fs::create_dir_all(root.join(d)).map_err(io_err(root.join(d)))?;
        }
        for i in 0..256 {
            let d = root.join("chunks").join(format!("{i:02x}"));
            if !d.exists() {
                fs::create_dir_all(&d).map_err(io_err(&d))?;
            }
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn chunk_path(&self, h: &ChunkHash) -> PathBuf {
        let hex = h.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(&hex[2..])
    }

    pub fn has_chunk(&self, h: &ChunkHash) -> bool {
        self.chunk_path(h).exists()
    }

    /// Stores a 4 KiB chunk unless its content is already there; returns
    /// its hash and the encoded bytes written (0 if it was already stored).
    pub fn put_chunk(&self, content: &[u8]) -> Result<(ChunkHash, u64)> {
        if content.len() != CHUNK_SIZE {
            return Err(Error::Invalid(format!("chunk of {} bytes", content.len())));
        }
        let h = ChunkHash::of(content);
        let p = self.chunk_path(&h);
        if p.exists() {
            return Ok((h, 0));
        }
        let enc = chunk::encode(content);
        atomic_write(&p, &enc, false)?;
        Ok((h, enc.len() as u64))
    }

    /// The encoded chunk, as stored (verified with [`Self::get_chunk`]).
    pub fn get_chunk_encoded(&self, h: &ChunkHash) -> Result<Vec<u8>> {
        let p = self.chunk_path(h);
        fs::read(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!("chunk {h}"))
            } else {
                Error::Io { path: p, source: e }
            }
        })
    }

    /// The chunk's content, verified against its hash.
    pub fn get_chunk(&self, h: &ChunkHash) -> Result<Vec<u8>> {
        chunk::decode_verified(h, &self.get_chunk_encoded(h)?)
    }

    /// Stores manifest bytes under their hash and returns it.
    pub fn put_manifest(&self, m: &Manifest) -> Result<ChunkHash> {
        let bytes = m.to_bytes();
        let h = ChunkHash::of(&bytes);
        let p = self.root.join("manifests").join(h.to_hex());
        if !p.exists() {
            atomic_write(&p, &bytes, true)?;
        }
        Ok(h)
    }

    pub fn get_manifest_bytes(&self, h: &ChunkHash) -> Result<Vec<u8>> {
        let p = self.root.join("manifests").join(h.to_hex());
        let b = fs::read(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!("manifest {h}"))
            } else {
                Error::Io { path: p.clone(), source: e }
            }
        })?;
        if &ChunkHash::of(&b) != h {
            return Err(Error::BadManifest(format!("{}: content does not match its hash", p.display())));
        }
        Ok(b)
    }

    pub fn get_manifest(&self, h: &ChunkHash) -> Result<Manifest> {
        Manifest::parse(&self.get_manifest_bytes(h)?)
    }

    fn app_dir(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join("appliances").join(name))
    }

    /// Points an appliance name at a manifest.
    pub fn set_appliance(&self, name: &str, manifest: &ChunkHash) -> Result<()> {
        let d = self.app_dir(name)?;
        fs::create_dir_all(&d).map_err(io_err(&d))?;
        atomic_write(&d.join("manifest"), format!("{manifest}\n").as_bytes(), true)
    }

    /// The manifest hash of an appliance.
    pub fn appliance(&self, name: &str) -> Result<ChunkHash> {
        let p = self.app_dir(name)?.join("manifest");
        let s = fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!("appliance `{name}`"))
            } else {
                Error::Io { path: p.clone(), source: e }
            }
        })?;
        ChunkHash::from_hex(s.trim())
    }

    pub fn appliances(&self) -> Result<Vec<String>> {
        let d = self.root.join("appliances");
        let mut v: Vec<String> = fs::read_dir(&d)
            .map_err(io_err(&d))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| valid_name(n))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Cuts memory (and a disk) into chunks, stores the new contents and the
    /// manifest, and points `name` at it. `free(pfn)` says whether a guest
    /// page frame is unallocated (the free-memory list); pages that are all
    /// zero are detected and marked too.
    pub fn create_appliance<'a>(
        &self,
        name: &str,
        config: serde_json::Value,
        device_state: Vec<u8>,
        memory: impl IntoIterator<Item = MemorySource<'a>>,
        free: &dyn Fn(u64) -> bool,
        disk: Option<&mut File>,
    ) -> Result<CreateReport> {
        check_name(name)?;
        let t0 = Instant::now();
        let mut b = ManifestBuilder::new(name, config, device_state);
        let mut rep = CreateReport::default();
        // Chunks are processed in batches, hashed, compressed and written by
        // two threads (file creation dominates on ext4); the index keeps order.
        const BATCH: usize = 2048;
        let mut batch: Vec<u8> = Vec::with_capacity(BATCH * CHUNK_SIZE);
        let flush = |batch: &mut Vec<u8>, rep: &mut CreateReport| -> Result<Vec<ChunkRef>> {
            let n = batch.len() / CHUNK_SIZE;
            let half = n.div_ceil(2) * CHUNK_SIZE;
            let (a, bb) = batch.split_at(half.min(batch.len()));
            let work = |part: &[u8]| -> Result<Vec<(ChunkRef, u64)>> {
                part.chunks_exact(CHUNK_SIZE)
                    .map(|c| {
                        if chunk::is_zero(c) {
                            Ok((ChunkRef::Zero, 0))
                        } else {
                            let (h, w) = self.put_chunk(c)?;
                            Ok((ChunkRef::Data(h), w))
                        }
                    })
                    .collect()
            };
            let (ra, rb) = std::thread::scope(|sc| {
                let t = sc.spawn(|| work(bb));
                (work(a), t.join().unwrap_or_else(|_| Err(Error::Invalid("chunk writer thread panicked".into()))))
            });
            batch.clear();
            let mut out = Vec::with_capacity(n);
            for (r, written) in ra?.into_iter().chain(rb?) {
                match r {
                    ChunkRef::Zero => rep.zero_chunks += 1,
                    _ => {
                        rep.data_chunks += 1;
                        rep.input_bytes += CHUNK_SIZE as u64;
                        if written > 0 {
                            rep.new_chunks += 1;
                            rep.stored_bytes += written;
                        } else {
                            rep.dedup_chunks += 1;
                        }
                    }
                }
                out.push(r);
            }
            Ok(out)
        };
        let mut buf = vec![0u8; CHUNK_SIZE];
        for mut src in memory {
            b.begin_region(src.gpa, src.size)?;
            let label = format!("memory region {:#x}", src.gpa);
            // Per chunk: Some(free) decided now; data chunks go through the batch.
            let mut pending: Vec<bool> = Vec::with_capacity(BATCH);
            let emit = |pending: &mut Vec<bool>, refs: Vec<ChunkRef>, b: &mut ManifestBuilder| -> Result<()> {
                let mut it = refs.into_iter();
                for is_free in pending.drain(..) {
                    let r = if is_free { ChunkRef::Free } else { it.next().expect("one result per data chunk") };
                    b.mem_chunk(r)?;
                }
                Ok(())
            };
            for k in 0..src.size / CHUNK_SIZE as u64 {
                src.data.read_exact(&mut buf).map_err(io_err(&label))?;
                rep.mem_chunks += 1;
                if free(src.gpa / CHUNK_SIZE as u64 + k) {
                    rep.free_chunks += 1;
                    pending.push(true);
                } else {
                    batch.extend_from_slice(&buf);
                    pending.push(false);
                }
                if batch.len() >= BATCH * CHUNK_SIZE {
                    let refs = flush(&mut batch, &mut rep)?;
                    emit(&mut pending, refs, &mut b)?;
                }
            }
            let refs = flush(&mut batch, &mut rep)?;
            emit(&mut pending, refs, &mut b)?;
        }
        if let Some(f) = disk {
            let size = f.metadata().map_err(io_err("disk"))?.len();
            b.set_disk_size(size);
            let mut r = std::io::BufReader::with_capacity(1 << 20, f);
            let mut left = size;
            while left > 0 {
                let n = left.min(CHUNK_SIZE as u64) as usize;
                buf.fill(0);
                r.read_exact(&mut buf[..n]).map_err(io_err("disk"))?;
                left -= n as u64;
                rep.disk_chunks += 1;
                batch.extend_from_slice(&buf);
                if batch.len() >= BATCH * CHUNK_SIZE || left == 0 {
                    for c in flush(&mut batch, &mut rep)? {
                        b.disk_chunk(c)?;
                    }
                }
            }
        }
        let m = b.finish()?;
        // Chunks were written without fsync each; make them durable before
        // the manifest that refers to them is published.
        let dir = File::open(self.root.join("chunks")).map_err(io_err(self.root.join("chunks")))?;
        rustix::fs::syncfs(&dir).map_err(|e| Error::Io { path: self.root.clone(), source: e.into() })?;
        let h = self.put_manifest(&m)?;
        self.set_appliance(name, &h)?;
        rep.manifest = h.to_hex();
        rep.manifest_bytes = m.to_bytes().len() as u64;
        rep.seconds = t0.elapsed().as_secs_f64();
        Ok(rep)
    }

    /// Stores an uploaded trace (already validated) under its hash.
    pub fn put_trace(&self, name: &str, bytes: &[u8]) -> Result<ChunkHash> {
        let d = self.app_dir(name)?.join("traces");
        fs::create_dir_all(&d).map_err(io_err(&d))?;
        let h = ChunkHash::of(bytes);
        atomic_write(&d.join(format!("{h}.trace")), bytes, true)?;
        Ok(h)
    }

    /// All stored traces of an appliance, oldest name order.
    pub fn traces(&self, name: &str) -> Result<Vec<Vec<u8>>> {
        let d = self.app_dir(name)?.join("traces");
        if !d.exists() {
            return Ok(Vec::new());
        }
        let mut paths: Vec<PathBuf> = fs::read_dir(&d)
            .map_err(io_err(&d))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "trace"))
            .collect();
        paths.sort();
        paths.iter().map(|p| fs::read(p).map_err(io_err(p))).collect()
    }

    /// Stores a new knowledge version (the next number) and returns it.
    pub fn put_knowledge(&self, name: &str, bytes: &[u8]) -> Result<u64> {
        let d = self.app_dir(name)?.join("knowledge");
        fs::create_dir_all(&d).map_err(io_err(&d))?;
        let v = self.latest_knowledge_version(name)?.unwrap_or(0) + 1;
        atomic_write(&d.join(format!("{v:08}.json")), bytes, true)?;
        Ok(v)
    }

    pub fn latest_knowledge_version(&self, name: &str) -> Result<Option<u64>> {
        let d = self.app_dir(name)?.join("knowledge");
        if !d.exists() {
            return Ok(None);
        }
        Ok(fs::read_dir(&d)
            .map_err(io_err(&d))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".json")?.parse::<u64>().ok())
            .max())
    }

    /// The latest knowledge version and its bytes.
    pub fn latest_knowledge(&self, name: &str) -> Result<(u64, Vec<u8>)> {
        let v = self
            .latest_knowledge_version(name)?
            .ok_or_else(|| Error::NotFound(format!("knowledge for appliance `{name}` (run the analysis)")))?;
        let p = self.app_dir(name)?.join("knowledge").join(format!("{v:08}.json"));
        Ok((v, fs::read(&p).map_err(io_err(&p))?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "appliance-test-{tag}-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Memory with a pattern: page p holds bytes derived from `seed` and p,
    /// every third page zero.
    pub fn memory(pages: usize, seed: u8) -> Vec<u8> {
        let mut m = vec![0u8; pages * CHUNK_SIZE];
        for p in 0..pages {
            if p % 3 == 2 {
                continue;
            }
            for (i, b) in m[p * CHUNK_SIZE..(p + 1) * CHUNK_SIZE].iter_mut().enumerate() {
                *b = (p as u8).wrapping_mul(31) ^ seed ^ (i / 64) as u8;
            }
        }
        m
    }

    #[test]
    fn create_dedup_and_read_back() {
        let d = tmpdir("store");
        let store = Store::open(&d).unwrap();
        let mem = memory(30, 1);
        let mut disk = tempfile_with(&d, &memory(5, 7)[..5 * 4096 - 100]);
        let rep = store
            .create_appliance(
                "a1",
                serde_json::json!({"vcpus": 1}),
                vec![9, 9],
                [MemorySource { gpa: 0, size: mem.len() as u64, data: Box::new(&mem[..]) }],
                &|pfn| pfn == 0,
                Some(&mut disk),
            )
            .unwrap();
        assert_eq!(rep.mem_chunks, 30);
        assert_eq!(rep.free_chunks, 1);
        assert_eq!(rep.zero_chunks, 10 + 1);
        assert_eq!(rep.disk_chunks, 5);
        let m = store.get_manifest(&store.appliance("a1").unwrap()).unwrap();
        assert_eq!(m.device_state, vec![9, 9]);
        assert_eq!(m.disk_size, Some(5 * 4096 - 100));
        for p in 1..30u64 {
            let want = &mem[p as usize * 4096..(p as usize + 1) * 4096];
            match m.mem_chunk(p * 4096).unwrap() {
                ChunkRef::Data(h) => assert_eq!(store.get_chunk(&h).unwrap(), want),
                ChunkRef::Zero => assert!(chunk::is_zero(want)),
                ChunkRef::Free => panic!("page {p} free"),
            }
        }
        assert_eq!(m.mem_chunk(0), Some(ChunkRef::Free));
        // A second appliance sharing most memory stores only what is new.
        let mut mem2 = mem.clone();
        mem2[4096..8192].fill(0xee);
        let rep2 = store
            .create_appliance(
                "a2",
                serde_json::Value::Null,
                vec![],
                [MemorySource { gpa: 0x1000_0000, size: mem2.len() as u64, data: Box::new(&mem2[..]) }],
                &|_| false,
                None,
            )
            .unwrap();
        // New: the changed page, and page 0 (free, so not stored, in a1).
        assert_eq!(rep2.new_chunks, 2);
        assert_eq!(rep2.dedup_chunks, rep2.data_chunks - 2);
        assert_eq!(store.appliances().unwrap(), vec!["a1", "a2"]);
        // Corruption on disk is detected on read.
        let h = match m.mem_chunk(4096).unwrap() {
            ChunkRef::Data(h) => h,
            _ => unreachable!(),
        };
        let mut enc = store.get_chunk_encoded(&h).unwrap();
        let last = enc.len() - 1;
        enc[last] ^= 0x55;
        fs::write(store.chunk_path(&h), &enc).unwrap();
        assert!(store.get_chunk(&h).is_err());
        // Bad names and short memory are refused.
        assert!(store.appliance("../x").is_err());
        assert!(matches!(store.appliance("nope"), Err(Error::NotFound(_))));
        let short = vec![1u8; 4096];
        let e = store
            .create_appliance(
                "a3",
                serde_json::Value::Null,
                vec![],
                [MemorySource { gpa: 0, size: 8192, data: Box::new(&short[..]) }],
                &|_| false,
                None,
            )
            .unwrap_err();
        assert!(e.to_string().contains("memory region 0x0"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    /// A store on a full file system: a clear I/O error naming the file, no panic.
    #[test]
    fn full_disk_is_a_clear_error() {
        let d = tmpdir("full");
        let mnt = d.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipping: cannot mount a tmpfs");
            return;
        }
        let res = (|| {
            let store = Store::open(mnt.join("store"))?;
            let mem = memory(600, 9);
            store.create_appliance(
                "big",
                serde_json::Value::Null,
                vec![],
                [MemorySource { gpa: 0, size: mem.len() as u64, data: Box::new(&mem[..]) }],
                &|_| false,
                None,
            )
        })();
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        let e = res.unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("No space left on device"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    pub fn tempfile_with(dir: &Path, data: &[u8]) -> File {
        let p = dir.join(format!("f-{}", TMP_COUNTER.fetch_add(1, Ordering::Relaxed)));
        fs::write(&p, data).unwrap();
        File::open(&p).unwrap()
    }

    #[test]
    fn knowledge_versions_and_traces() {
        let d = tmpdir("know");
        let store = Store::open(&d).unwrap();
        assert!(store.latest_knowledge("x").is_err());
        assert_eq!(store.put_knowledge("x", b"{}").unwrap(), 1);
        assert_eq!(store.put_knowledge("x", b"{2}").unwrap(), 2);
        assert_eq!(store.latest_knowledge("x").unwrap(), (2, b"{2}".to_vec()));
        store.put_trace("x", b"t1").unwrap();
        store.put_trace("x", b"t2").unwrap();
        assert_eq!(store.traces("x").unwrap().len(), 2);
        fs::remove_dir_all(&d).unwrap();
    }
}
