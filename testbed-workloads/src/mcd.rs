//! A memcached server's core (`no_std`, no allocation): a store for byte
//! keys and values with a checksum on every value, verified on every read,
//! and the memcached text protocol over per-connection buffers (enough for
//! memslap and for tests: `get`/`gets`, `set`/`add`/`replace`, `delete`,
//! `version`, `stats`, `quit`). The testbed guest runs it behind its TCP
//! stack; host tests run it directly.
//!
//! Store layout (open addressing, linear probing, fixed slots over a
//! `&mut [u64]`): `[tag, meta, checksum, key words..., value words...]`;
//! `tag` is the key's hash with the low bit set (0 = empty, 2 = deleted),
//! `meta` packs key length (8 bits), value length (24 bits) and flags (32).

use crate::rng::mix;

/// Longest key (memcached's limit).
pub const MAX_KEY: usize = 250;
const KEY_WORDS: usize = MAX_KEY.div_ceil(8);
const HDR_WORDS: usize = 3;
const EMPTY: u64 = 0;
const DELETED: u64 = 2;

/// What the server counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub gets: u64,
    pub hits: u64,
    pub sets: u64,
    pub deletes: u64,
    /// Values whose checksum did not match (a lost or corrupted page).
    pub corrupt: u64,
    /// Malformed commands answered with an error.
    pub bad_commands: u64,
}

/// The store.
pub struct Store<'a> {
    table: &'a mut [u64],
    slot_words: usize,
    slots: usize,
    max_value: usize,
    items: usize,
}

fn hash(key: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in key {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    mix(h) | 1
}

fn value_checksum(key_hash: u64, v: &[u8], flags: u32) -> u64 {
    let mut a = key_hash ^ ((v.len() as u64) << 32 | flags as u64);
    for chunk in v.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        a = mix(a ^ u64::from_le_bytes(w));
    }
    a
}

/// Bytes of `words` as a byte slice (little-endian words).
fn write_bytes(words: &mut [u64], bytes: &[u8]) {
    for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_le_bytes(b);
    }
}

fn read_bytes(words: &[u64], out: &mut [u8]) {
    for (chunk, w) in out.chunks_mut(8).zip(words) {
        let b = w.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

impl<'a> Store<'a> {
    /// A store over `table` for values up to `max_value` bytes; `None` if it
    /// would hold fewer than 16 items.
    pub fn new(table: &'a mut [u64], max_value: usize) -> Option<Self> {
        let max_value = max_value.clamp(1, (1 << 24) - 1);
        let slot_words = HDR_WORDS + KEY_WORDS + max_value.div_ceil(8);
        let slots = table.len() / slot_words;
        if slots < 16 {
            return None;
        }
        table[..slots * slot_words].fill(0);
        Some(Self { table, slot_words, slots, max_value, items: 0 })
    }

    pub fn max_value(&self) -> usize {
        self.max_value
    }

    pub fn items(&self) -> usize {
        self.items
    }

    /// Items the store takes before it refuses new keys (3/4 of its slots).
    pub fn capacity(&self) -> usize {
        self.slots * 3 / 4
    }

    fn slot(&self, i: usize) -> &[u64] {
        &self.table[i * self.slot_words..(i + 1) * self.slot_words]
    }

    fn key_matches(&self, i: usize, tag: u64, key: &[u8]) -> bool {
        let s = self.slot(i);
        if s[0] != tag || (s[1] & 0xff) as usize != key.len() {
            return false;
        }
        let mut k = [0u8; MAX_KEY];
        read_bytes(&s[HDR_WORDS..HDR_WORDS + KEY_WORDS], &mut k[..key.len()]);
        &k[..key.len()] == key
    }

    /// (slot of the key, or the first free slot on its probe path).
    fn find(&self, key: &[u8]) -> (Option<usize>, Option<usize>) {
        let tag = hash(key);
        let mut free = None;
        let start = (tag >> 1) as usize % self.slots;
        for n in 0..self.slots {
            let i = (start + n) % self.slots;
            match self.slot(i)[0] {
                EMPTY => return (None, free.or(Some(i))),
                DELETED => free = free.or(Some(i)),
                _ if self.key_matches(i, tag, key) => return (Some(i), free),
                _ => {}
            }
        }
        (None, free)
    }

    /// Where `key`'s value is: (slot, length, flags).
    pub fn lookup(&self, key: &[u8]) -> Option<(usize, usize, u32)> {
        let (Some(i), _) = self.find(key) else { return None };
        let s = self.slot(i);
        let len = (((s[1] >> 8) & 0xff_ffff) as usize).min(self.max_value);
        Some((i, len, (s[1] >> 32) as u32))
    }

    /// Copies the value in `slot` (of `out.len()` bytes, from
    /// [`Self::lookup`]) into `out`; false if its checksum does not match.
    pub fn read_value(&self, slot: usize, out: &mut [u8]) -> bool {
        let s = self.slot(slot);
        read_bytes(&s[HDR_WORDS + KEY_WORDS..], out);
        value_checksum(s[0], out, (s[1] >> 32) as u32) == s[2]
    }

    /// Copies the value of `key` into `out`; returns (length, flags), or
    /// `Err(())` if its checksum does not match (or `out` is too small).
    pub fn get(&self, key: &[u8], out: &mut [u8]) -> Option<Result<(usize, u32), ()>> {
        let (i, len, flags) = self.lookup(key)?;
        if len > out.len() {
            return Some(Err(()));
        }
        Some(if self.read_value(i, &mut out[..len]) { Ok((len, flags)) } else { Err(()) })
    }

    /// Stores a value. `must_exist`/`must_not_exist` give replace/add.
    /// Returns whether it was stored.
    pub fn set(&mut self, key: &[u8], value: &[u8], flags: u32, mode: SetMode) -> bool {
        if key.is_empty() || key.len() > MAX_KEY || value.len() > self.max_value {
            return false;
        }
        let (found, free) = self.find(key);
        let i = match (found, mode) {
            (Some(_), SetMode::Add) | (None, SetMode::Replace) => return false,
            (Some(i), _) => i,
            (None, _) => match free {
                Some(i) if self.items < self.capacity() => {
                    self.items += 1;
                    i
                }
                _ => return false,
            },
        };
        let tag = hash(key);
        let w = self.slot_words;
        let s = &mut self.table[i * w..(i + 1) * w];
        s[0] = tag;
        s[1] = key.len() as u64 | (value.len() as u64) << 8 | (flags as u64) << 32;
        s[2] = value_checksum(tag, value, flags);
        write_bytes(&mut s[HDR_WORDS..HDR_WORDS + KEY_WORDS], key);
        write_bytes(&mut s[HDR_WORDS + KEY_WORDS..], value);
        true
    }

    /// Deletes `key`; returns whether it was there.
    pub fn delete(&mut self, key: &[u8]) -> bool {
        let (Some(i), _) = self.find(key) else { return false };
        self.table[i * self.slot_words] = DELETED;
        self.items -= 1;
        true
    }
}

/// Which of set / add / replace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetMode {
    Set,
    Add,
    Replace,
}

/// Input bytes a connection buffers (a command line plus a value).
pub const IN_BUF: usize = 8192;
/// Output bytes a connection buffers.
pub const OUT_BUF: usize = 16384;
/// Longest command line.
const MAX_LINE: usize = 2048;

/// A storage command whose data block has not fully arrived.
#[derive(Clone, Copy, Debug)]
struct PendingSet {
    key: [u8; MAX_KEY],
    key_len: usize,
    flags: u32,
    bytes: usize,
    mode: SetMode,
    noreply: bool,
    /// The value is too large: its bytes are read and dropped.
    discard: bool,
}

/// One client connection's protocol state and buffers.
pub struct Conn {
    inp: [u8; IN_BUF],
    in_len: usize,
    out: [u8; OUT_BUF],
    out_start: usize,
    out_end: usize,
    pending: Option<PendingSet>,
    /// Bytes of a value too large to buffer still to be dropped.
    skip: usize,
    quit: bool,
}

impl Default for Conn {
    fn default() -> Self {
        Self::new()
    }
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |a, &d| a.checked_mul(10)?.checked_add((d - b'0') as u64))
}

impl Conn {
    pub const fn new() -> Self {
        Self {
            inp: [0; IN_BUF],
            in_len: 0,
            out: [0; OUT_BUF],
            out_start: 0,
            out_end: 0,
            pending: None,
            skip: 0,
            quit: false,
        }
    }

    /// Forgets everything (the connection closed; the slot is reused).
    pub fn reset(&mut self) {
        self.in_len = 0;
        self.out_start = 0;
        self.out_end = 0;
        self.pending = None;
        self.skip = 0;
        self.quit = false;
    }

    /// Room for more input from the client.
    pub fn input_space(&mut self) -> &mut [u8] {
        &mut self.inp[self.in_len..]
    }

    /// `n` bytes were written into [`Self::input_space`].
    pub fn input_filled(&mut self, n: usize) {
        self.in_len = (self.in_len + n).min(IN_BUF);
    }

    /// Responses waiting to be sent.
    pub fn output(&self) -> &[u8] {
        &self.out[self.out_start..self.out_end]
    }

    /// `n` bytes of [`Self::output`] were sent.
    pub fn output_sent(&mut self, n: usize) {
        self.out_start = (self.out_start + n).min(self.out_end);
        if self.out_start == self.out_end {
            self.out_start = 0;
            self.out_end = 0;
        }
    }

    /// The client asked to close (`quit`) and everything is sent.
    pub fn wants_close(&self) -> bool {
        self.quit && self.out_start == self.out_end
    }

    fn out_room(&self) -> usize {
        OUT_BUF - self.out_end
    }

    fn emit(&mut self, parts: &[&[u8]]) {
        for p in parts {
            let n = p.len().min(OUT_BUF - self.out_end);
            self.out[self.out_end..self.out_end + n].copy_from_slice(&p[..n]);
            self.out_end += n;
        }
    }

    fn emit_num(&mut self, v: u64) {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        let mut v = v;
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        let digits = buf;
        self.emit(&[&digits[i..]]);
    }

    fn consume(&mut self, n: usize) {
        self.inp.copy_within(n..self.in_len, 0);
        self.in_len -= n;
    }

    /// Handles every complete command in the input while the output has room
    /// for the largest response; returns the operations done.
    pub fn process(&mut self, store: &mut Store, c: &mut Counters) -> u64 {
        let mut ops = 0;
        let worst = store.max_value() + MAX_KEY + 64;
        while !self.quit {
            if self.skip > 0 {
                let n = self.skip.min(self.in_len);
                self.consume(n);
                self.skip -= n;
                if self.skip > 0 {
                    break;
                }
                continue;
            }
            if let Some(p) = self.pending {
                if p.discard {
                    self.pending = None;
                    self.skip = p.bytes + 2;
                    self.emit(&[b"SERVER_ERROR object too large for cache\r\n"]);
                    c.bad_commands += 1;
                    continue;
                }
                if self.in_len < p.bytes + 2 {
                    break;
                }
                self.pending = None;
                if &self.inp[p.bytes..p.bytes + 2] != b"\r\n" {
                    // Drop the bad block up to the end of its line.
                    let eol = self.inp[p.bytes..self.in_len].iter().position(|&b| b == b'\n');
                    self.consume(eol.map_or(self.in_len, |e| p.bytes + e + 1));
                    c.bad_commands += 1;
                    self.emit(&[b"CLIENT_ERROR bad data chunk\r\n"]);
                    continue;
                }
                let stored = store.set(&p.key[..p.key_len], &self.inp[..p.bytes], p.flags, p.mode);
                self.consume(p.bytes + 2);
                c.sets += 1;
                ops += 1;
                if !p.noreply {
                    self.emit(&[if stored { b"STORED\r\n" } else { b"NOT_STORED\r\n" }]);
                }
                continue;
            }
            if self.out_room() < worst {
                break;
            }
            let Some(eol) = self.inp[..self.in_len].iter().position(|&b| b == b'\n') else {
                if self.in_len >= MAX_LINE {
                    // No end of line in sight: drop the connection's input.
                    self.in_len = 0;
                    c.bad_commands += 1;
                    self.emit(&[b"CLIENT_ERROR line too long\r\n"]);
                }
                break;
            };
            let mut line = [0u8; MAX_LINE];
            let len = eol.min(MAX_LINE);
            line[..len].copy_from_slice(&self.inp[..len]);
            self.consume(eol + 1);
            let l = if len > 0 && line[len - 1] == b'\r' { &line[..len - 1] } else { &line[..len] };
            ops += self.command(l, store, c);
        }
        ops
    }

    /// One command line; returns the operations it did.
    fn command(&mut self, line: &[u8], store: &mut Store, c: &mut Counters) -> u64 {
        let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let Some(cmd) = words.next() else {
            c.bad_commands += 1;
            self.emit(&[b"ERROR\r\n"]);
            return 0;
        };
        match cmd {
            b"get" | b"gets" => {
                let cas = cmd == b"gets";
                let mut n = 0;
                for key in words {
                    // Every answer must fit in the output buffer.
                    if self.out_room() < store.max_value() + MAX_KEY + 64 {
                        break;
                    }
                    c.gets += 1;
                    n += 1;
                    let Some((slot, len, flags)) = store.lookup(key) else { continue };
                    let mark = self.out_end;
                    self.emit(&[b"VALUE ", key, b" "]);
                    self.emit_num(flags as u64);
                    self.emit(&[b" "]);
                    self.emit_num(len as u64);
                    self.emit(&[if cas { b" 0\r\n" } else { b"\r\n" }]);
                    let at = self.out_end;
                    if !store.read_value(slot, &mut self.out[at..at + len]) {
                        self.out_end = mark;
                        c.corrupt += 1;
                        self.emit(&[b"SERVER_ERROR checksum mismatch\r\n"]);
                        return n;
                    }
                    self.out_end += len;
                    self.emit(&[b"\r\n"]);
                    c.hits += 1;
                }
                if n == 0 {
                    c.bad_commands += 1;
                    self.emit(&[b"ERROR\r\n"]);
                    return 0;
                }
                self.emit(&[b"END\r\n"]);
                n
            }
            b"set" | b"add" | b"replace" => {
                let mode = match cmd {
                    b"add" => SetMode::Add,
                    b"replace" => SetMode::Replace,
                    _ => SetMode::Set,
                };
                let (key, flags, _exp, bytes) = (words.next(), words.next(), words.next(), words.next());
                let noreply = words.next() == Some(b"noreply");
                let parsed = (|| {
                    let key = key.filter(|k| k.len() <= MAX_KEY)?;
                    let flags = u32::try_from(parse_u64(flags?)?).ok()?;
                    parse_u64(_exp?)?;
                    let bytes = usize::try_from(parse_u64(bytes?)?).ok()?;
                    Some((key, flags, bytes))
                })();
                let Some((key, flags, bytes)) = parsed else {
                    c.bad_commands += 1;
                    self.emit(&[b"CLIENT_ERROR bad command line format\r\n"]);
                    return 0;
                };
                let mut k = [0u8; MAX_KEY];
                k[..key.len()].copy_from_slice(key);
                let discard = bytes > store.max_value() || bytes + 2 > IN_BUF;
                self.pending = Some(PendingSet { key: k, key_len: key.len(), flags, bytes, mode, noreply, discard });
                0
            }
            b"delete" => {
                let Some(key) = words.next() else {
                    c.bad_commands += 1;
                    self.emit(&[b"ERROR\r\n"]);
                    return 0;
                };
                let noreply = words.any(|w| w == b"noreply");
                let found = store.delete(key);
                c.deletes += 1;
                if !noreply {
                    self.emit(&[if found { b"DELETED\r\n" } else { b"NOT_FOUND\r\n" }]);
                }
                1
            }
            b"version" => {
                self.emit(&[b"VERSION 1.6.0-testbed\r\n"]);
                0
            }
            b"stats" => {
                self.emit(&[b"STAT curr_items "]);
                self.emit_num(store.items() as u64);
                self.emit(&[b"\r\nSTAT get_hits "]);
                self.emit_num(c.hits);
                self.emit(&[b"\r\nSTAT cmd_get "]);
                self.emit_num(c.gets);
                self.emit(&[b"\r\nSTAT cmd_set "]);
                self.emit_num(c.sets);
                self.emit(&[b"\r\nEND\r\n"]);
                0
            }
            b"quit" => {
                self.quit = true;
                0
            }
            _ => {
                c.bad_commands += 1;
                self.emit(&[b"ERROR\r\n"]);
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    fn talk(conn: &mut Conn, store: &mut Store, c: &mut Counters, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = input;
        loop {
            let space = conn.input_space();
            let n = space.len().min(rest.len());
            space[..n].copy_from_slice(&rest[..n]);
            conn.input_filled(n);
            rest = &rest[n..];
            conn.process(store, c);
            let o = conn.output().to_vec();
            conn.output_sent(o.len());
            out.extend(o);
            if rest.is_empty() && conn.output().is_empty() {
                conn.process(store, c);
                let o = conn.output().to_vec();
                conn.output_sent(o.len());
                out.extend(o);
                if conn.output().is_empty() {
                    return out;
                }
            }
        }
    }

    #[test]
    fn the_protocol_memslap_speaks() {
        let mut table = vec![0u64; 1 << 18];
        let mut store = Store::new(&mut table, 4096).unwrap();
        let mut conn = Conn::new();
        let mut c = Counters::default();
        let r = talk(&mut conn, &mut store, &mut c, b"set k1 5 0 3\r\nabc\r\nget k1 k2\r\n");
        assert_eq!(r, b"STORED\r\nVALUE k1 5 3\r\nabc\r\nEND\r\n");
        let r =
            talk(&mut conn, &mut store, &mut c, b"add k1 0 0 1\r\nx\r\nreplace k2 0 0 1\r\nx\r\nadd k2 0 0 1\r\ny\r\n");
        assert_eq!(r, b"NOT_STORED\r\nNOT_STORED\r\nSTORED\r\n");
        let r = talk(&mut conn, &mut store, &mut c, b"gets k2\r\ndelete k2\r\ndelete k2\r\nget k2\r\n");
        assert_eq!(r, b"VALUE k2 0 1 0\r\ny\r\nEND\r\nDELETED\r\nNOT_FOUND\r\nEND\r\n");
        let r = talk(&mut conn, &mut store, &mut c, b"set k3 0 0 2 noreply\r\nhi\r\nget k3\r\nbogus\r\n\r\n");
        assert_eq!(r, b"VALUE k3 0 2\r\nhi\r\nEND\r\nERROR\r\nERROR\r\n");
        // A value split over many reads, and one too large for the store.
        let big = vec![b'v'; 3000];
        let mut req = b"set big 0 0 3000\r\n".to_vec();
        req.extend_from_slice(&big);
        req.extend_from_slice(b"\r\nset huge 0 0 5000\r\n");
        req.extend(vec![b'h'; 5000]);
        req.extend_from_slice(b"\r\nget big huge\r\n");
        let r = talk(&mut conn, &mut store, &mut c, &req);
        let mut want = b"STORED\r\nSERVER_ERROR object too large for cache\r\nVALUE big 0 3000\r\n".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"\r\nEND\r\n");
        assert_eq!(r, want);
        // Bad lines.
        let r = talk(&mut conn, &mut store, &mut c, b"set x y 0 1\r\nset x 0 0 1\r\nab\r\nget\r\n");
        assert_eq!(r, b"CLIENT_ERROR bad command line format\r\nCLIENT_ERROR bad data chunk\r\nERROR\r\n");
        assert!(c.bad_commands >= 4);
        assert_eq!(c.corrupt, 0);
        let r = talk(&mut conn, &mut store, &mut c, b"quit\r\nget k1\r\n");
        assert!(r.is_empty());
        assert!(conn.wants_close());
    }

    #[test]
    fn a_corrupted_value_is_detected_not_returned() {
        let mut table = vec![0u64; 1 << 16];
        {
            let mut store = Store::new(&mut table, 1024).unwrap();
            assert!(store.set(b"key", b"value-value", 7, SetMode::Set));
        }
        // Flip a bit in the stored value (as a lost page would).
        let slot_words = HDR_WORDS + KEY_WORDS + 128;
        let i = table.chunks(slot_words).position(|s| s[0] != 0).unwrap();
        table[i * slot_words + HDR_WORDS + KEY_WORDS] ^= 1 << 9;
        let mut store =
            Store { items: 1, slot_words, slots: table.len() / slot_words, max_value: 1024, table: &mut table };
        let mut conn = Conn::new();
        let mut c = Counters::default();
        let r = talk(&mut conn, &mut store, &mut c, b"get key\r\n");
        assert_eq!(r, b"SERVER_ERROR checksum mismatch\r\n");
        assert_eq!(c.corrupt, 1);
    }

    #[test]
    fn the_store_fills_to_capacity_and_reuses_deleted_slots() {
        let mut table = vec![0u64; 64 * (HDR_WORDS + KEY_WORDS + 8)];
        let mut store = Store::new(&mut table, 64).unwrap();
        let cap = store.capacity();
        let key = |i: usize| std::format!("key-{i}");
        for i in 0..cap {
            assert!(store.set(key(i).as_bytes(), key(i).as_bytes(), i as u32, SetMode::Set), "{i}");
        }
        assert!(!store.set(b"one-too-many", b"x", 0, SetMode::Set));
        assert!(store.delete(key(3).as_bytes()));
        assert!(store.set(b"one-too-many", b"x", 0, SetMode::Set));
        let mut out = [0u8; 64];
        for i in (0..cap).filter(|&i| i != 3) {
            let (n, f) = store.get(key(i).as_bytes(), &mut out).unwrap().unwrap();
            assert_eq!((&out[..n], f), (key(i).as_bytes(), i as u32));
        }
        assert!(store.get(key(3).as_bytes(), &mut out).is_none());
    }
}
