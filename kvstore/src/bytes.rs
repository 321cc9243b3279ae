//! `Bytes`: the byte string type of keys and values. Strings up to
//! [`INLINE_CAP`] bytes live inside the entry itself (no allocation, no
//! extra cache miss, and one page fewer dirtied per write); longer ones own
//! a heap buffer. Every allocation is fallible.

use alloc::vec::Vec;

use crate::store::{try_copy, Oom};

/// Longest string kept inline (sized so that `Bytes` is 32 bytes).
pub(crate) const INLINE_CAP: usize = 30;

pub(crate) enum Bytes {
    Inline { len: u8, buf: [u8; INLINE_CAP] },
    Heap(Vec<u8>),
}

impl Bytes {
    fn inline(s: &[u8]) -> Self {
        let mut buf = [0u8; INLINE_CAP];
        buf[..s.len()].copy_from_slice(s);
        Bytes::Inline {
            len: s.len() as u8,
            buf,
        }
    }

    /// The empty string.
    pub(crate) fn empty() -> Self {
        Self::inline(&[])
    }

    /// A copy of `s`.
    pub(crate) fn new(s: &[u8]) -> Result<Self, Oom> {
        if s.len() <= INLINE_CAP {
            Ok(Self::inline(s))
        } else {
            Ok(Bytes::Heap(try_copy(s)?))
        }
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Inline { len, buf } => &buf[..*len as usize],
            Bytes::Heap(v) => v,
        }
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        match self {
            Bytes::Inline { len, .. } => *len as usize,
            Bytes::Heap(v) => v.len(),
        }
    }

    /// Room without reallocating.
    #[inline]
    fn capacity(&self) -> usize {
        match self {
            Bytes::Inline { .. } => INLINE_CAP,
            Bytes::Heap(v) => v.capacity(),
        }
    }

    /// Bytes charged for this string: its length when inline, its heap
    /// capacity otherwise.
    #[inline]
    pub(crate) fn footprint(&self) -> usize {
        match self {
            Bytes::Inline { len, .. } => *len as usize,
            Bytes::Heap(v) => v.capacity(),
        }
    }

    /// Whether `set` with `n` bytes would reuse the current heap buffer
    /// (it fits and would not waste more than about half of it).
    #[inline]
    fn reuses(&self, n: usize) -> bool {
        matches!(self, Bytes::Heap(v) if v.capacity() >= n && v.capacity() <= 2 * n + 64)
    }

    /// The footprint that `set` with `n` bytes leaves.
    #[inline]
    pub(crate) fn footprint_after_set(&self, n: usize) -> usize {
        if n <= INLINE_CAP {
            n
        } else if self.reuses(n) {
            self.capacity()
        } else {
            n
        }
    }

    /// Replaces the contents with `s`, reusing storage when possible.
    #[inline]
    pub(crate) fn set(&mut self, s: &[u8]) -> Result<(), Oom> {
        if s.len() <= INLINE_CAP {
            *self = Self::inline(s);
        } else if self.reuses(s.len()) {
            if let Bytes::Heap(v) = self {
                v.clear();
                v.extend_from_slice(s);
            }
        } else {
            *self = Bytes::Heap(try_copy(s)?);
        }
        Ok(())
    }

    /// The footprint after appending `add` bytes, when a reallocation to
    /// `target` capacity is needed for bytes that do not fit in place.
    pub(crate) fn footprint_after_append(&self, add: usize, target: usize) -> usize {
        let need = self.len() + add;
        match self {
            Bytes::Inline { .. } if need <= INLINE_CAP => need,
            _ if need <= self.capacity() => self.capacity(),
            _ => target,
        }
    }

    /// Appends `s`; when it does not fit in place, first moves to a heap
    /// buffer of capacity `target` (at least the new length).
    pub(crate) fn append(&mut self, s: &[u8], target: usize) -> Result<(), Oom> {
        let need = self.len() + s.len();
        if need > self.capacity() {
            match self {
                Bytes::Heap(v) => v
                    .try_reserve_exact(target.max(need) - v.len())
                    .map_err(|_| Oom)?,
                Bytes::Inline { len, buf } => {
                    let mut v = Vec::new();
                    v.try_reserve_exact(target.max(need)).map_err(|_| Oom)?;
                    v.extend_from_slice(&buf[..*len as usize]);
                    *self = Bytes::Heap(v);
                }
            }
        }
        match self {
            Bytes::Inline { len, buf } => {
                buf[*len as usize..need].copy_from_slice(s);
                *len = need as u8;
            }
            Bytes::Heap(v) => v.extend_from_slice(s),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_compact() {
        assert!(core::mem::size_of::<Bytes>() <= 32);
    }

    #[test]
    fn inline_heap_transitions() {
        let mut b = Bytes::new(b"short").unwrap();
        assert!(matches!(b, Bytes::Inline { .. }));
        assert_eq!((b.as_slice(), b.footprint()), (&b"short"[..], 5));
        b.append(b"-and-still-fits-inline-", 0).unwrap();
        assert_eq!(b.len(), 28);
        assert!(matches!(b, Bytes::Inline { .. }));
        assert_eq!(b.footprint_after_append(10, 80), 80);
        b.append(b"0123456789", 80).unwrap();
        assert!(matches!(b, Bytes::Heap(_)));
        assert_eq!(b.as_slice(), b"short-and-still-fits-inline-0123456789");
        assert_eq!(b.footprint(), 80);
        assert_eq!(b.footprint_after_append(2, 999), 80, "fits in place");
        assert_eq!(b.footprint_after_set(60), 80, "reused");
        b.set(&[b'x'; 60]).unwrap();
        assert_eq!(b.footprint(), 80);
        assert_eq!(b.footprint_after_set(300), 300);
        b.set(&[b'y'; 300]).unwrap();
        assert_eq!((b.len(), b.footprint()), (300, 300));
        assert_eq!(b.footprint_after_set(3), 3);
        b.set(b"abc").unwrap();
        assert!(matches!(b, Bytes::Inline { .. }));
        assert_eq!(b.as_slice(), b"abc");
        assert_eq!(Bytes::new(&[7; 31]).unwrap().footprint(), 31);
    }
}
