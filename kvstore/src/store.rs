//! The keyspace: string keys to string values with optional expiry times.
//!
//! Entries live in a slab of fixed-size chunks (so growing never copies or
//! moves existing entries and never needs twice the memory), indexed by a
//! `hashbrown` table of slab indices hashed with a seeded `foldhash`. A key's
//! slab index never changes while it lives, which makes the SCAN cursor (a
//! slab index) stable: a key present for a whole scan is returned exactly
//! once. The slab is two parallel ones: what a write of a key without a TTL
//! leaves alone (its key, hash and expiry: [`Entry`]) and what it changes
//! (its value and version: [`Val`], 40 bytes). Under nvhv's epochs every
//! page written recently is compared each epoch, so random SETs over a
//! keyspace keep only the values' pages hot (100 000 keys: ~980 pages
//! instead of ~2 400 with both halves in one 96-byte entry). Keys with a
//! TTL are also listed in `expires`, which the incremental active expiry
//! walks round-robin.
//!
//! Memory: every key is charged its key and value bytes (heap capacity for
//! strings too long to be stored inline) plus `ENTRY_OVERHEAD` against
//! `mem_limit`; writes are checked before anything is
//! allocated and every allocation is fallible (`try_reserve`), so the store
//! reports [`Oom`] instead of aborting.

use alloc::vec::Vec;
use core::hash::BuildHasher;
use core::mem;

use foldhash::fast::FixedState;
use hashbrown::HashTable;

use crate::bytes::Bytes;

const CHUNK_SHIFT: u32 = 10;
const CHUNK: usize = 1 << CHUNK_SHIFT;
const NONE: u32 = u32::MAX;
/// Upper bound on slab slots (indices are `u32`, `NONE` is reserved).
const MAX_SLOTS: usize = NONE as usize;
/// `expire_at` of a key without a TTL.
const NO_EXPIRE: u64 = u64::MAX;
/// Greedy growth of APPENDed values stops doubling here (like Redis's sds).
const APPEND_GREEDY_MAX: usize = 1 << 20;

/// Estimated bytes a key costs beyond its key and value bytes: its slab
/// slots (which hold keys and values of up to 30 bytes inline), a
/// hash-table bucket at typical load, its share of the expiry list and the
/// allocator headers of heap strings.
pub const ENTRY_OVERHEAD: usize = mem::size_of::<Slot>() + mem::size_of::<Val>() + 8 + 4 + 32;

/// A write was refused because it would exceed the memory limit, or an
/// allocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Oom;

/// One live key: what a write of its value leaves alone.
pub(crate) struct Entry {
    key: Bytes,
    hash: u64,
    expire_at: u64,
    /// Position in `Store::expires`, or `NONE`.
    exp_pos: u32,
}

/// One key's value and version, at the key's slab index in `Store::vals`
/// (an empty value at a free index).
pub(crate) struct Val {
    bytes: Bytes,
    /// The state version of the key's last change ([`Store::version`]).
    ver: u64,
}

impl Val {
    fn empty() -> Self {
        Val {
            bytes: Bytes::empty(),
            ver: 0,
        }
    }
}

enum Slot {
    Used(Entry),
    /// A free slot, linking to the next free one (`NONE` ends the list).
    Free(u32),
}

/// Result of looking a key up for a write: its slot, or the hash to insert it with.
pub(crate) enum Lookup {
    Found(u32),
    Absent(u64),
}

/// What a write does to the key's TTL.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Ttl {
    /// Remove any TTL (plain SET).
    Clear,
    /// Leave the TTL as it is (KEEPTTL, INCR, APPEND).
    Keep,
    /// Expire after this time (ms on the caller's clock).
    At(u64),
}

/// Counters reported by INFO.
#[derive(Default, Clone)]
pub(crate) struct Stats {
    pub(crate) commands: u64,
    pub(crate) rejected: u64,
    pub(crate) expired: u64,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) start_ms: Option<u64>,
    pub(crate) clients: u64,
}

/// The keyspace (a single database, `db0`).
pub struct Store {
    hasher: FixedState,
    table: HashTable<u32>,
    chunks: Vec<Vec<Slot>>,
    /// Parallel to `chunks`: the values (see the module header).
    vals: Vec<Vec<Val>>,
    nslots: usize,
    free_head: u32,
    live: usize,
    expires: Vec<u32>,
    exp_cursor: usize,
    used: usize,
    mem_limit: usize,
    pub(crate) stats: Stats,
    /// See [`Store::version`].
    pub(crate) version: u64,
    /// The version of the last deletion (what a miss depends on).
    del_ver: u64,
    /// The newest version among the keys (and misses) looked up since the
    /// caller last cleared it: what a read's reply depends on.
    pub(crate) read_dep: u64,
    /// Mutable borrows of `chunks` slots (tests: which operations write entries).
    #[cfg(test)]
    slot_writes: usize,
    /// Mutable borrows of `vals` slots (tests).
    #[cfg(test)]
    val_writes: usize,
}

/// Slab index `i` in chunked slab `chunks` (`Store::chunks` or `Store::vals`).
#[inline]
fn at<T>(chunks: &[Vec<T>], i: u32) -> &T {
    &chunks[(i >> CHUNK_SHIFT) as usize][i as usize & (CHUNK - 1)]
}

#[inline]
fn at_mut<T>(chunks: &mut [Vec<T>], i: u32) -> &mut T {
    &mut chunks[(i >> CHUNK_SHIFT) as usize][i as usize & (CHUNK - 1)]
}

#[inline]
fn entry_in(chunks: &[Vec<Slot>], i: u32) -> &Entry {
    match at(chunks, i) {
        Slot::Used(e) => e,
        Slot::Free(_) => unreachable!("kvstore: index {i} points at a free slot"),
    }
}

#[inline]
fn cost(e: &Entry, v: &Val) -> usize {
    e.key.footprint() + v.bytes.footprint() + ENTRY_OVERHEAD
}

/// Copies `data` into a new exactly-sized vector, failing instead of aborting.
pub(crate) fn try_copy(data: &[u8]) -> Result<Vec<u8>, Oom> {
    let mut v = Vec::new();
    v.try_reserve_exact(data.len()).map_err(|_| Oom)?;
    v.extend_from_slice(data);
    Ok(v)
}

impl Store {
    /// An empty keyspace hashing with `seed` and refusing writes that would
    /// take [`Store::used_bytes`] above `mem_limit` (`usize::MAX`: no limit).
    pub fn new(seed: u64, mem_limit: usize) -> Self {
        Store {
            hasher: FixedState::with_seed(seed),
            table: HashTable::new(),
            chunks: Vec::new(),
            vals: Vec::new(),
            nslots: 0,
            free_head: NONE,
            live: 0,
            expires: Vec::new(),
            exp_cursor: 0,
            used: 0,
            mem_limit,
            stats: Stats::default(),
            version: 0,
            del_ver: 0,
            read_dep: 0,
            #[cfg(test)]
            slot_writes: 0,
            #[cfg(test)]
            val_writes: 0,
        }
    }

    /// The state version: a counter that grows with every change of the
    /// keyspace (each key remembers the version of its last change, each
    /// deletion, by command or expiry, is one), with every write command
    /// (even one that fails) and with CONFIG. Reads, connection commands
    /// and INFO leave it: per-connection state does not outlive a crash
    /// anyway, and INFO's counters are statistics, not data. Together with
    /// [`crate::Conn::dep`] it tells nvhv (`nvhv_abi::OUTPUT_DEPS_PORT`)
    /// which replies depend only on committed data.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Number of keys, including expired keys not yet reclaimed.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Bytes charged for the keys and values (see [`ENTRY_OVERHEAD`]).
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    pub fn mem_limit(&self) -> usize {
        self.mem_limit
    }

    /// Number of keys that have a TTL.
    pub fn expires_len(&self) -> usize {
        self.expires.len()
    }

    /// The value of `key` at time `now_ms` (expiring it lazily if due).
    pub fn get(&mut self, key: &[u8], now_ms: u64) -> Option<&[u8]> {
        match self.lookup(key, now_ms) {
            Lookup::Found(i) => Some(self.value(i)),
            Lookup::Absent(_) => None,
        }
    }

    /// Active expiry step: examines at most `budget` keys that have a TTL,
    /// round-robin, and deletes those due at `now_ms`. Returns how many were
    /// deleted. Meant to be called when the caller is idle.
    pub fn expire_some(&mut self, now_ms: u64, budget: usize) -> usize {
        self.note_time(now_ms);
        let mut deleted = 0;
        for _ in 0..budget {
            if self.expires.is_empty() {
                break;
            }
            if self.exp_cursor >= self.expires.len() {
                self.exp_cursor = 0;
            }
            let i = self.expires[self.exp_cursor];
            if now_ms > self.entry(i).expire_at {
                // swap_remove moves another key into `exp_cursor`: look at it next.
                self.remove_idx(i);
                self.stats.expired += 1;
                deleted += 1;
            } else {
                self.exp_cursor += 1;
            }
        }
        deleted
    }

    /// Remembers the first time seen, for INFO's uptime.
    pub(crate) fn note_time(&mut self, now_ms: u64) {
        if self.stats.start_ms.is_none() {
            self.stats.start_ms = Some(now_ms);
        }
    }

    #[inline]
    fn slot_mut(&mut self, i: u32) -> &mut Slot {
        #[cfg(test)]
        {
            self.slot_writes += 1;
        }
        at_mut(&mut self.chunks, i)
    }

    #[inline]
    fn val_mut(&mut self, i: u32) -> &mut Val {
        #[cfg(test)]
        {
            self.val_writes += 1;
        }
        at_mut(&mut self.vals, i)
    }

    #[inline]
    fn val(&self, i: u32) -> &Val {
        at(&self.vals, i)
    }

    #[inline]
    fn entry(&self, i: u32) -> &Entry {
        entry_in(&self.chunks, i)
    }

    #[inline]
    fn entry_mut(&mut self, i: u32) -> &mut Entry {
        match self.slot_mut(i) {
            Slot::Used(e) => e,
            Slot::Free(_) => unreachable!("kvstore: index {i} points at a free slot"),
        }
    }

    /// The value stored in slot `i` (from a [`Lookup::Found`]).
    #[inline]
    pub(crate) fn value(&self, i: u32) -> &[u8] {
        self.val(i).bytes.as_slice()
    }

    /// The absolute expiry time of slot `i`, if it has a TTL.
    #[inline]
    pub(crate) fn expire_at(&self, i: u32) -> Option<u64> {
        let t = self.entry(i).expire_at;
        (t != NO_EXPIRE).then_some(t)
    }

    /// Finds `key`, deleting it first if it has expired at `now`.
    #[inline]
    pub(crate) fn lookup(&mut self, key: &[u8], now: u64) -> Lookup {
        let hash = self.hasher.hash_one(key);
        let chunks = &self.chunks;
        let found = self
            .table
            .find(hash, |&i| entry_in(chunks, i).key.as_slice() == key)
            .copied();
        match found {
            Some(i) if now > self.entry(i).expire_at => {
                self.remove_idx(i);
                self.stats.expired += 1;
                Lookup::Absent(hash)
            }
            Some(i) => {
                self.read_dep = self.read_dep.max(self.val(i).ver);
                Lookup::Found(i)
            }
            None => {
                self.read_dep = self.read_dep.max(self.del_ver);
                Lookup::Absent(hash)
            }
        }
    }

    /// A deletion: a new version, which every miss from now on depends on.
    fn deleted(&mut self) {
        self.version += 1;
        self.del_ver = self.version;
    }

    /// Slot `i` changed: a new version, remembered by the key.
    fn stamp(&mut self, i: u32) {
        self.version += 1;
        let v = self.version;
        self.val_mut(i).ver = v;
    }

    /// Whether a write growing usage by `add` and shrinking it by `sub` fits.
    #[inline]
    fn check(&self, add: usize, sub: usize) -> Result<(), Oom> {
        if add > sub && self.used.saturating_sub(sub).saturating_add(add) > self.mem_limit {
            return Err(Oom);
        }
        Ok(())
    }

    /// Whether adding `bytes` of new keys and values (with their per-key
    /// overhead already included) would exceed the limit.
    pub(crate) fn would_exceed(&self, bytes: usize) -> bool {
        self.check(bytes, 0).is_err()
    }

    /// Makes sure a new entry can be placed without allocating.
    fn reserve_slot(&mut self) -> Result<(), Oom> {
        if self.free_head != NONE || self.nslots % CHUNK != 0 {
            return Ok(());
        }
        if self.nslots >= MAX_SLOTS {
            return Err(Oom);
        }
        self.chunks.try_reserve(1).map_err(|_| Oom)?;
        self.vals.try_reserve(1).map_err(|_| Oom)?;
        let mut chunk = Vec::new();
        chunk.try_reserve_exact(CHUNK).map_err(|_| Oom)?;
        let mut vals = Vec::new();
        vals.try_reserve_exact(CHUNK).map_err(|_| Oom)?;
        // Both pushed only once both are allocated: the two slabs keep one length.
        self.chunks.push(chunk);
        self.vals.push(vals);
        Ok(())
    }

    /// Places `e` and `v` in a slot reserved by `reserve_slot`.
    fn take_slot(&mut self, e: Entry, v: Val) -> u32 {
        if self.free_head != NONE {
            let i = self.free_head;
            let slot = self.slot_mut(i);
            let next = match slot {
                Slot::Free(next) => *next,
                Slot::Used(_) => unreachable!("kvstore: free list points at a used slot"),
            };
            *slot = Slot::Used(e);
            *self.val_mut(i) = v;
            self.free_head = next;
            i
        } else {
            let i = self.nslots as u32;
            let last = self.chunks.last_mut().expect("reserve_slot made a chunk");
            debug_assert!(last.len() < last.capacity());
            last.push(Slot::Used(e));
            let last = self.vals.last_mut().expect("reserve_slot made a chunk");
            debug_assert!(last.len() < last.capacity());
            last.push(v);
            self.nslots += 1;
            i
        }
    }

    /// Inserts a key known to be absent (`hash` from [`Lookup::Absent`]).
    pub(crate) fn insert(
        &mut self,
        hash: u64,
        key: &[u8],
        val: &[u8],
        ttl: Ttl,
    ) -> Result<u32, Oom> {
        self.check(key.len() + val.len() + ENTRY_OVERHEAD, 0)?;
        if matches!(ttl, Ttl::At(_)) {
            self.expires.try_reserve(1).map_err(|_| Oom)?;
        }
        self.reserve_slot()?;
        let chunks = &self.chunks;
        self.table
            .try_reserve(1, |&i| entry_in(chunks, i).hash)
            .map_err(|_| Oom)?;
        let e = Entry {
            key: Bytes::new(key)?,
            hash,
            expire_at: NO_EXPIRE,
            exp_pos: NONE,
        };
        let v = Val {
            bytes: Bytes::new(val)?,
            ver: 0,
        };
        self.used += cost(&e, &v);
        self.live += 1;
        let i = self.take_slot(e, v);
        let chunks = &self.chunks;
        self.table
            .insert_unique(hash, i, |&j| entry_in(chunks, j).hash);
        self.apply_ttl(i, ttl);
        self.stamp(i);
        Ok(i)
    }

    /// Replaces the value in slot `i`, reusing its buffer when it fits.
    pub(crate) fn overwrite(&mut self, i: u32, val: &[u8], ttl: Ttl) -> Result<(), Oom> {
        if matches!(ttl, Ttl::At(_)) {
            self.expires.try_reserve(1).map_err(|_| Oom)?;
        }
        let (old, new) = {
            let v = &self.val(i).bytes;
            (v.footprint(), v.footprint_after_set(val.len()))
        };
        self.check(new, old)?;
        // The same bytes again change nothing a reply could show: no new
        // version, and nothing is written, so the entry's page is not even
        // dirtied (under epochs a write to a page costs a write fault or
        // keeps the page in the hot set, compared every epoch, even when
        // the bytes it writes are those already there).
        let same = self.val(i).bytes.as_slice() == val;
        if !same {
            let v = &mut self.val_mut(i).bytes;
            v.set(val)?;
            let new = v.footprint();
            self.used = self.used - old + new;
        }
        self.apply_ttl(i, ttl);
        if !same {
            self.stamp(i);
        }
        Ok(())
    }

    /// Appends to the value in slot `i`, growing it greedily like Redis's sds
    /// (doubling up to 1 MiB, then 1 MiB at a time). Returns the new length.
    pub(crate) fn append(&mut self, i: u32, data: &[u8]) -> Result<usize, Oom> {
        let v = &self.val(i).bytes;
        let old = v.footprint();
        let need = v.len().checked_add(data.len()).ok_or(Oom)?;
        let greedy = if need < APPEND_GREEDY_MAX {
            need * 2
        } else {
            need.saturating_add(APPEND_GREEDY_MAX)
        };
        let target = if self
            .check(v.footprint_after_append(data.len(), greedy), old)
            .is_ok()
        {
            greedy
        } else {
            self.check(v.footprint_after_append(data.len(), need), old)?;
            need
        };
        let v = &mut self.val_mut(i).bytes;
        v.append(data, target)?;
        let (new, len) = (v.footprint(), v.len());
        self.used = self.used - old + new;
        self.stamp(i);
        Ok(len)
    }

    /// Sets the TTL of slot `i`; for `Ttl::At` the caller reserved room in `expires`.
    fn apply_ttl(&mut self, i: u32, ttl: Ttl) {
        match ttl {
            Ttl::Keep => {}
            Ttl::Clear => {
                self.persist(i);
            }
            Ttl::At(t) => {
                let pos = self.entry(i).exp_pos;
                if pos == NONE {
                    debug_assert!(self.expires.len() < self.expires.capacity());
                    self.expires.push(i);
                    self.entry_mut(i).exp_pos = (self.expires.len() - 1) as u32;
                }
                if self.entry(i).expire_at != t {
                    self.entry_mut(i).expire_at = t;
                    self.stamp(i);
                }
            }
        }
    }

    /// Gives slot `i` the absolute expiry time `at`.
    pub(crate) fn set_expire(&mut self, i: u32, at: u64) -> Result<(), Oom> {
        self.expires.try_reserve(1).map_err(|_| Oom)?;
        self.apply_ttl(i, Ttl::At(at));
        Ok(())
    }

    /// Removes the TTL of slot `i`; returns whether it had one.
    pub(crate) fn persist(&mut self, i: u32) -> bool {
        let pos = self.entry(i).exp_pos;
        if pos == NONE {
            return false;
        }
        self.unlink_expire(pos);
        let e = self.entry_mut(i);
        e.exp_pos = NONE;
        e.expire_at = NO_EXPIRE;
        self.stamp(i);
        true
    }

    fn unlink_expire(&mut self, pos: u32) {
        let pos = pos as usize;
        self.expires.swap_remove(pos);
        if let Some(&moved) = self.expires.get(pos) {
            self.entry_mut(moved).exp_pos = pos as u32;
        }
    }

    /// Deletes the key in slot `i`.
    pub(crate) fn remove_idx(&mut self, i: u32) {
        self.deleted();
        let hash = self.entry(i).hash;
        if let Ok(found) = self.table.find_entry(hash, |&j| j == i) {
            found.remove();
        }
        let next_free = self.free_head;
        let old = mem::replace(self.slot_mut(i), Slot::Free(next_free));
        let old_val = mem::replace(self.val_mut(i), Val::empty());
        self.free_head = i;
        if let Slot::Used(e) = old {
            if e.exp_pos != NONE {
                self.unlink_expire(e.exp_pos);
            }
            self.used -= cost(&e, &old_val);
            self.live -= 1;
        }
    }

    /// Deletes `key` if it exists (and has not expired); returns whether it did.
    pub(crate) fn remove(&mut self, key: &[u8], now: u64) -> bool {
        match self.lookup(key, now) {
            Lookup::Found(i) => {
                self.remove_idx(i);
                true
            }
            Lookup::Absent(_) => false,
        }
    }

    /// Deletes every key and frees the structures.
    pub(crate) fn flush(&mut self) {
        self.deleted();
        self.table = HashTable::new();
        self.chunks = Vec::new();
        self.vals = Vec::new();
        self.nslots = 0;
        self.free_head = NONE;
        self.live = 0;
        self.expires = Vec::new();
        self.exp_cursor = 0;
        self.used = 0;
    }

    /// Calls `f` with every key not expired at `now` (KEYS).
    pub(crate) fn for_each_key(&self, now: u64, mut f: impl FnMut(&[u8])) {
        for chunk in &self.chunks {
            for slot in chunk {
                if let Slot::Used(e) = slot {
                    if now <= e.expire_at {
                        f(e.key.as_slice());
                    }
                }
            }
        }
    }

    /// One SCAN step from `cursor`: visits slots until `count` keys were
    /// passed to `f` or `10 * count` slots were looked at, deleting expired
    /// keys on the way. Returns the next cursor, 0 when the scan is complete.
    pub(crate) fn scan(
        &mut self,
        cursor: u64,
        count: usize,
        now: u64,
        mut f: impl FnMut(&[u8]),
    ) -> u64 {
        let Ok(mut i) = usize::try_from(cursor) else {
            return 0;
        };
        let max_visit = count.saturating_mul(10);
        let (mut seen, mut visited) = (0usize, 0usize);
        while i < self.nslots && seen < count && visited < max_visit {
            let idx = i as u32;
            if let Slot::Used(e) = at(&self.chunks, idx) {
                if now > e.expire_at {
                    self.remove_idx(idx);
                    self.stats.expired += 1;
                } else {
                    f(e.key.as_slice());
                    seen += 1;
                }
            }
            i += 1;
            visited += 1;
        }
        if i >= self.nslots {
            0
        } else {
            i as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn key(n: usize) -> Vec<u8> {
        format!("key:{n}").into_bytes()
    }

    fn put(s: &mut Store, k: &[u8], v: &[u8], ttl: Ttl) {
        match s.lookup(k, 0) {
            Lookup::Found(i) => s.overwrite(i, v, ttl).unwrap(),
            Lookup::Absent(h) => {
                s.insert(h, k, v, ttl).unwrap();
            }
        }
    }

    #[test]
    fn insert_get_remove_accounting() {
        let mut s = Store::new(7, usize::MAX);
        put(&mut s, b"a", b"1", Ttl::Clear);
        put(&mut s, b"bb", b"22", Ttl::Clear);
        assert_eq!(s.len(), 2);
        assert_eq!(s.used_bytes(), 2 * ENTRY_OVERHEAD + 1 + 1 + 2 + 2);
        assert_eq!(s.get(b"a", 0), Some(&b"1"[..]));
        assert!(s.remove(b"a", 0));
        assert!(!s.remove(b"a", 0));
        assert_eq!(s.used_bytes(), ENTRY_OVERHEAD + 4);
        s.flush();
        assert_eq!((s.len(), s.used_bytes()), (0, 0));
    }

    #[test]
    fn free_slots_are_reused() {
        let mut s = Store::new(1, usize::MAX);
        for n in 0..3000 {
            put(&mut s, &key(n), b"v", Ttl::Clear);
        }
        for n in 0..3000 {
            assert!(s.remove(&key(n), 0));
        }
        for n in 0..3000 {
            put(&mut s, &key(n), b"v", Ttl::Clear);
        }
        assert_eq!(s.nslots, 3000, "slab did not grow: freed slots were reused");
        assert_eq!(s.len(), 3000);
    }

    #[test]
    fn scan_visits_every_key_exactly_once() {
        let mut s = Store::new(99, usize::MAX);
        for n in 0..5000 {
            put(&mut s, &key(n), b"x", Ttl::Clear);
        }
        // Punch holes so that some SCAN steps see free slots.
        for n in (0..5000).step_by(7) {
            s.remove(&key(n), 0);
        }
        let mut seen = Vec::new();
        let mut cursor = 0;
        let mut calls = 0;
        loop {
            cursor = s.scan(cursor, 13, 0, |k| seen.push(k.to_vec()));
            calls += 1;
            if cursor == 0 {
                break;
            }
        }
        let unique: HashSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "a key was returned twice");
        assert_eq!(seen.len(), s.len());
        assert!(calls > 5000 / 13 / 2);
    }

    #[test]
    fn active_expiry_deletes_only_due_keys() {
        let mut s = Store::new(3, usize::MAX);
        for n in 0..100 {
            put(
                &mut s,
                &key(n),
                b"v",
                Ttl::At(if n % 2 == 0 { 10 } else { 1000 }),
            );
        }
        put(&mut s, b"forever", b"v", Ttl::Clear);
        assert_eq!(s.expires_len(), 100);
        assert_eq!(s.expire_some(5, 1000), 0);
        let mut total = 0;
        for _ in 0..10 {
            total += s.expire_some(11, 15);
        }
        assert_eq!(total, 50);
        assert_eq!(s.len(), 51);
        assert_eq!(s.expires_len(), 50);
        assert_eq!(s.expire_some(2000, 1000), 50);
        assert_eq!(s.len(), 1);
        assert_eq!(s.get(b"forever", 5000), Some(&b"v"[..]));
    }

    /// Rewriting a key with the bytes and TTL it has takes no mutable
    /// borrow of its slot, so the guest does not even dirty its page.
    #[test]
    fn an_identical_rewrite_writes_nothing_into_the_entry() {
        let mut s = Store::new(3, usize::MAX);
        let long = [7u8; 100];
        put(&mut s, b"k", b"same", Ttl::Clear);
        put(&mut s, b"long", &long, Ttl::Clear);
        put(&mut s, b"t", b"v", Ttl::At(50));
        let before = s.slot_writes + s.val_writes;
        put(&mut s, b"k", b"same", Ttl::Clear);
        put(&mut s, b"k", b"same", Ttl::Keep);
        put(&mut s, b"long", &long, Ttl::Clear);
        put(&mut s, b"t", b"v", Ttl::At(50));
        assert_eq!(
            s.slot_writes + s.val_writes,
            before,
            "an identical rewrite wrote an entry"
        );
        put(&mut s, b"k", b"other", Ttl::Clear);
        assert!(s.slot_writes + s.val_writes > before);
        let before = s.slot_writes + s.val_writes;
        put(&mut s, b"t", b"v", Ttl::At(60));
        assert!(
            s.slot_writes + s.val_writes > before,
            "a new TTL must be written"
        );
    }

    /// A new value for a key without a TTL writes its value slot only, so
    /// random SETs keep only the values' pages hot under epochs.
    #[test]
    fn a_new_value_writes_only_the_value_slab() {
        let mut s = Store::new(3, usize::MAX);
        for n in 0..3000 {
            put(&mut s, &key(n), b"v0", Ttl::Clear);
        }
        let (slots, vals) = (s.slot_writes, s.val_writes);
        for n in 0..3000 {
            put(&mut s, &key(n), format!("v{n}").as_bytes(), Ttl::Clear);
        }
        assert_eq!(s.slot_writes, slots, "a value write touched the entries");
        assert!(s.val_writes >= vals + 3000);
        for n in 0..3000 {
            assert_eq!(s.get(&key(n), 0), Some(format!("v{n}").as_bytes()));
        }
        // A freed index's value is dropped, and its reuse takes the new one.
        assert!(s.remove(&key(5), 0));
        assert_eq!(s.get(&key(5), 0), None);
        put(&mut s, b"new", b"fresh", Ttl::Clear);
        assert_eq!(s.get(b"new", 0), Some(&b"fresh"[..]));
        assert_eq!(s.nslots, 3000, "the freed index was reused");
    }

    #[test]
    fn persist_and_ttl_bookkeeping() {
        let mut s = Store::new(3, usize::MAX);
        put(&mut s, b"a", b"v", Ttl::At(50));
        put(&mut s, b"b", b"v", Ttl::At(60));
        let Lookup::Found(a) = s.lookup(b"a", 0) else {
            panic!()
        };
        assert_eq!(s.expire_at(a), Some(50));
        assert!(s.persist(a));
        assert!(!s.persist(a));
        assert_eq!(s.expire_at(a), None);
        assert_eq!(s.expires_len(), 1);
        let Lookup::Found(b) = s.lookup(b"b", 0) else {
            panic!()
        };
        put(&mut s, b"b", b"w", Ttl::Keep);
        assert_eq!(s.expire_at(b), Some(60));
        assert!(matches!(s.lookup(b"b", 61), Lookup::Absent(_)));
        assert_eq!(s.expires_len(), 0);
    }

    #[test]
    fn memory_limit_refuses_growth() {
        let mut s = Store::new(3, ENTRY_OVERHEAD + 20);
        put(&mut s, b"k1", b"0123456789", Ttl::Clear);
        let Lookup::Absent(h) = s.lookup(b"k2", 0) else {
            panic!()
        };
        assert_eq!(s.insert(h, b"k2", b"0123456789ab", Ttl::Clear), Err(Oom));
        let Lookup::Found(i) = s.lookup(b"k1", 0) else {
            panic!()
        };
        assert_eq!(s.append(i, &[b'x'; 100]), Err(Oom));
        assert_eq!(s.value(i), b"0123456789");
        // Shrinking writes are always allowed.
        s.overwrite(i, b"", Ttl::Clear).unwrap();
        assert_eq!(s.append(i, b"abc"), Ok(3));
    }
}
