//! The C memory functions (`memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`)
//! that the prebuilt `core`, `alloc` and compiler-generated code call: on the
//! host target `compiler_builtins` does not provide them and there is no libc.
//!
//! The copies and fills are `rep movsb`/`rep stosb` in inline assembly, so the
//! compiler cannot turn them back into calls to themselves; the comparisons
//! use plain loads (LLVM does not rewrite loops into `memcmp`/`bcmp` calls).

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest`; the regions must not overlap.
///
/// # Safety
/// `src` must be valid for reading and `dest` for writing `n` bytes, and the
/// two ranges must not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; DF is clear per the SysV ABI,
    // so `rep movsb` copies forwards.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the regions may overlap.
///
/// # Safety
/// `src` must be valid for reading and `dest` for writing `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if n == 0 {
        return dest;
    }
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src, or the ranges do not overlap: a forward copy
        // never overwrites a byte before reading it.
        // SAFETY: the caller guarantees both ranges; DF is clear (SysV ABI).
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") n => _,
                inout("rdi") dest => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags)
            );
        }
    } else {
        // dest overlaps the tail of src: copy backwards from the last byte,
        // with DF set for the copy only (the ABI wants it clear again after).
        // SAFETY: the caller guarantees both ranges; `n - 1` does not
        // underflow (n > 0), and DF is restored with `cld`.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dest.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
    }
    dest
}

/// Fills `n` bytes at `dest` with the low byte of `c`.
///
/// # Safety
/// `dest` must be valid for writing `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; DF is clear (SysV ABI).
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// Compares `n` bytes: negative, zero or positive as the first differing byte
/// of `a` is below, equal to or above that of `b` (as unsigned bytes).
///
/// # Safety
/// `a` and `b` must be valid for reading `n` bytes.
#[no_mangle]
#[inline(never)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, so both 8-byte reads are in range; unaligned
        // reads are fine on x86-64.
        let (x, y) = unsafe {
            (
                (a.add(i) as *const u64).read_unaligned(),
                (b.add(i) as *const u64).read_unaligned(),
            )
        };
        if x != y {
            // Memory order is little endian: byte-swap so that the first
            // byte is the most significant.
            return if x.swap_bytes() < y.swap_bytes() {
                -1
            } else {
                1
            };
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// Compares `n` bytes for equality: zero if equal, non-zero otherwise.
///
/// # Safety
/// `a` and `b` must be valid for reading `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
