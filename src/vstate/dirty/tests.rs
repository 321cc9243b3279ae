//! Tests of the dirty tracker: collected payloads rebuild guest memory, the chunked bitmap scan, the hot set and its retirement, re-protection spans.

use super::*;
use crate::nvram::test_rng::Rng;

/// A tracker and a guest memory of `npages` pages.
struct Fixture {
    t: DirtyTracker,
    guest: Vec<u8>,
}

impl Fixture {
    fn new(npages: usize, budget: usize) -> Self {
        let mut t = DirtyTracker::new(budget);
        t.size_for(npages);
        Fixture {
            t,
            guest: vec![0; npages * PAGE],
        }
    }

    /// With the compare helper thread, woken before every capture.
    fn with_helper(npages: usize, budget: usize) -> Self {
        let mut f = Fixture::new(npages, budget);
        f.t.splitter = Some(Splitter::spawn().unwrap());
        f
    }

    fn fill(&mut self, pfn: u64, byte: u8) {
        self.guest[pfn as usize * PAGE..][..PAGE].fill(byte);
    }

    /// One capture as `capture` does it: retire (returning the pages
    /// re-protected), then take the pages KVM reports: every hot page
    /// plus `written` (pages written while protected).
    fn capture(&mut self, written: &[u64]) -> (Vec<u64>, Changes) {
        let npages = self.guest.len() / PAGE;
        let mut kvm = vec![0u64; npages.div_ceil(64)];
        for h in &self.t.hot {
            kvm[h.pfn as usize / 64] |= 1 << (h.pfn % 64);
        }
        let retired = match self.t.retire() {
            Some((first, bitmap)) => (first as u64..(first + bitmap.len() * 64) as u64)
                .filter(|&p| bitmap[(p as usize - first) / 64] & (1 << (p % 64)) != 0)
                .collect(),
            None => Vec::new(),
        };
        for &p in written {
            kvm[p as usize / 64] |= 1 << (p % 64);
        }
        let mut out = Changes::default();
        self.t.prepare();
        self.t.take(&self.guest, &kvm, &mut out).unwrap();
        (retired, out)
    }

    fn hot(&self, pfn: u64) -> Option<Hot> {
        match self.t.at[pfn as usize] {
            0 => None,
            a if a & RETIRING != 0 => None,
            a => Some(self.t.hot[a as usize - 1]),
        }
    }
}

/// The invariant delta logging rests on: the payloads, applied in order
/// to what guest memory was at the start, rebuild guest memory after
/// every capture (a shadow is always what the RAM image holds for its
/// page). Random words of random pages are written between captures;
/// the small hot budget makes pages go cold and come back.
#[test]
fn payloads_replayed_in_order_rebuild_guest_memory() {
    replay_rebuilds(Fixture::new(64, 8));
}

/// The same with the compares split between two threads (many pages a
/// capture, so that both take chunks).
#[test]
fn payloads_replayed_in_order_rebuild_guest_memory_with_the_helper() {
    replay_rebuilds(Fixture::with_helper(64, 8));
    let helped = replay_rebuilds(Fixture::with_helper(2048, 1024));
    if second_core() {
        assert!(helped > 0, "the helper never took a chunk");
    }
}

/// Returns how many chunks the helper took in all.
fn replay_rebuilds(mut f: Fixture) -> usize {
    let mut helped = 0;
    use crate::nvram::redo::{decode_writes, RECORD_VERSION};
    let npages = f.guest.len() / PAGE;
    let writes_per_step = if npages > 64 { 200 } else { 6 };
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut image = f.guest.clone();
    let mut whole = 0usize;
    let mut deltas = 0usize;
    for step in 0..3000 {
        let mut written = Vec::new();
        for _ in 0..rng.below(writes_per_step) {
            let pfn = rng.below(npages as u64);
            let page = &mut f.guest[pfn as usize * PAGE..][..PAGE];
            for _ in 0..=rng.below(3) {
                // Toggling (a byte back to what it was two epochs ago)
                // catches a delta taken against a stale shadow.
                let at = rng.below(PAGE as u64 / 16) as usize;
                page[at] ^= 0x5a;
            }
            if step % 97 == 0 {
                page.copy_from_slice(&rng.bytes(PAGE));
            }
            if f.hot(pfn).is_none() && !written.contains(&pfn) {
                written.push(pfn);
            }
        }
        let (_, c) = f.capture(&written);
        helped += f.t.helped;
        let n = c.payload.pfns().len();
        assert_eq!(c.pages.len(), n * PAGE);
        let writes =
            decode_writes(RECORD_VERSION, c.payload.bytes(), n as u64, npages as u64).unwrap();
        for w in &writes {
            let at = w.pfn as usize * PAGE + w.offset;
            image[at..at + w.data.len()].copy_from_slice(w.data);
            if w.data.len() == PAGE {
                whole += 1;
            } else {
                deltas += 1;
            }
        }
        for (i, &pfn) in c.payload.pfns().iter().enumerate() {
            let page = &f.guest[pfn as usize * PAGE..][..PAGE];
            assert!(
                c.pages[i * PAGE..][..PAGE] == *page,
                "step {step}: page {pfn}"
            );
        }
        assert!(
            image == f.guest,
            "step {step}: the log no longer rebuilds memory"
        );
    }
    assert!(
        whole > 100 && deltas > 1000,
        "{whole} whole pages, {deltas} deltas"
    );
    helped
}

#[test]
fn the_chunked_scan_finds_every_set_word_in_order() {
    let mut rng = Rng(7);
    for len in [0usize, 1, 7, 8, 9, 63, 64, 65, 1000] {
        for density in [0u64, 1, 50, 1000] {
            let words: Vec<u64> = (0..len)
                .map(|_| {
                    if rng.below(1000) < density {
                        1 << rng.below(64)
                    } else {
                        0
                    }
                })
                .collect();
            let mut seen = Vec::new();
            for_each_set_word(&words, |i, w| seen.push((i, w)));
            let want: Vec<(usize, u64)> = words
                .iter()
                .enumerate()
                .filter(|(_, &w)| w != 0)
                .map(|(i, &w)| (i, w))
                .collect();
            assert_eq!(seen, want, "len {len} density {density}");
        }
    }
    // The last word, alone in a partial chunk and in a full one.
    for len in [9usize, 16] {
        let mut words = vec![0u64; len];
        words[len - 1] = u64::MAX;
        let mut seen = Vec::new();
        for_each_set_word(&words, |i, w| seen.push((i, w)));
        assert_eq!(seen, vec![(len - 1, u64::MAX)]);
    }
}

#[test]
fn unchanged_hot_pages_are_dropped_and_changed_ones_kept() {
    let mut f = Fixture::new(64, 100);
    f.fill(3, 1);
    f.fill(9, 2);
    let (_, c) = f.capture(&[3, 9]);
    assert_eq!(
        c.payload.pfns(),
        vec![3, 9],
        "pages written while protected are logged"
    );
    assert_eq!(f.t.faulted(), 2);
    f.fill(9, 7);
    let (_, c) = f.capture(&[]);
    assert_eq!(c.payload.pfns(), vec![9]);
    assert_eq!(f.t.faulted(), 0, "hot pages do not fault");
    assert_eq!(c.pages.len(), PAGE);
    assert!(c.pages.iter().all(|&b| b == 7), "the new bytes are logged");
    assert_eq!(f.hot(3).unwrap().unchanged, 1);
    assert_eq!(f.hot(9).unwrap().unchanged, 0);
    // The shadow follows the logged bytes: 9 back to 2 is a change again.
    f.fill(9, 2);
    let (_, c) = f.capture(&[]);
    assert_eq!(c.payload.pfns(), vec![9]);
    assert_eq!(f.hot(3).unwrap().unchanged, 2);
}

#[test]
fn pages_retire_after_their_hold_and_are_compared_once_more() {
    let mut f = Fixture::new(64, 100);
    f.fill(8, 4);
    f.fill(9, 4);
    f.capture(&[8, 9]);
    for _ in 0..FIRST_HOLD {
        let (retired, c) = f.capture(&[]);
        assert!(retired.is_empty() && c.payload.pfns().is_empty());
    }
    // Unchanged for their first hold: both are re-protected now and
    // compared one last time; 9 changed just before.
    f.fill(9, 5);
    let (retired, c) = f.capture(&[]);
    assert_eq!(retired, vec![8, 9]);
    assert_eq!(
        c.payload.pfns(),
        vec![9],
        "unchanged retiring page dropped, changed one logged"
    );
    assert!(f.hot(8).is_none() && f.hot(9).is_none());
    assert_eq!(f.t.free.len(), 2, "both shadows freed");
    let (retired, c) = f.capture(&[]);
    assert!(
        retired.is_empty() && c.payload.pfns().is_empty(),
        "cold pages are not reported"
    );
    // Written again after being re-protected: it faulted, it is logged,
    // and a freed shadow slot is reused.
    let (_, c) = f.capture(&[8]);
    assert_eq!(c.payload.pfns(), vec![8]);
    assert_eq!(f.t.faulted(), 1);
    assert_eq!(f.t.free.len(), 1);
}

#[test]
fn a_page_back_soon_after_going_cold_stays_hot_longer() {
    let mut f = Fixture::new(64, 100);
    f.capture(&[5, 6]);
    assert_eq!(f.hot(5).unwrap().hold, FIRST_HOLD, "hot for the first time");
    for _ in 0..=FIRST_HOLD {
        f.capture(&[]);
    }
    assert!(f.hot(5).is_none(), "retired after its hold");
    // 5 comes back at once: its hold doubles. 6 comes back after more
    // than twice its hold: it starts again at HOT_EPOCHS.
    f.capture(&[5]);
    assert_eq!(f.hot(5).unwrap().hold, 2 * HOT_EPOCHS);
    for _ in 0..2 * HOT_EPOCHS {
        f.capture(&[]);
    }
    f.capture(&[6]);
    assert_eq!(f.hot(6).unwrap().hold, HOT_EPOCHS);
    // Doubling stops at the cap.
    for _ in 0..2 * MAX_HOLD_SHIFT {
        while f.hot(5).is_some() {
            f.capture(&[]);
        }
        f.capture(&[5]);
    }
    assert_eq!(f.hot(5).unwrap().hold, HOT_EPOCHS << MAX_HOLD_SHIFT);
}

/// A page whose writes grow rarer, as the pages of a store do once its
/// keys are all inserted, is never kept hot much past the break-even
/// (~80 unchanged epochs, a fault's cost over a compare's) after a
/// write, however often it came back before: every extra epoch hot is
/// a compare for nothing. (With holds doubling to 1 024 it stayed hot
/// ~1 000 epochs after each of the rare writes.)
#[test]
fn pages_written_rarely_leave_the_hot_set_soon_after_each_write() {
    let mut f = Fixture::new(64, 100);
    let mut byte = 0u8;
    let mut idle_hot = Vec::new();
    for gap in [40, 100, 200, 400, 800, 1500, 1500, 1500, 1500] {
        byte = byte.wrapping_add(1);
        f.fill(7, byte);
        let written = if f.hot(7).is_some() { vec![] } else { vec![7] };
        f.capture(&written);
        let mut n = 0;
        for _ in 1..gap {
            f.capture(&[]);
            n += usize::from(f.hot(7).is_some());
        }
        idle_hot.push(n);
    }
    assert!(
        idle_hot.iter().all(|&n| n <= 80),
        "epochs hot and unchanged after each write: {idle_hot:?}"
    );
    assert!(idle_hot.iter().all(|&n| n >= 2), "{idle_hot:?}");
}

#[test]
fn re_protection_covers_only_the_span_of_the_cold_pages() {
    let mut f = Fixture::new(512, 100);
    f.capture(&[130, 200, 300]);
    f.t.hot[f.t.at[300] as usize - 1].unchanged = 0;
    for i in 0..f.t.hot.len() {
        if f.t.hot[i].pfn != 300 {
            f.t.hot[i].unchanged = HOT_EPOCHS;
        }
    }
    let (first, bitmap) = f.t.retire().expect("two pages go cold");
    assert_eq!(first, 128, "a multiple of 64 at or below the lowest");
    assert_eq!(bitmap.len(), 2, "words up to the highest cold page only");
    assert_eq!(bitmap[0], 1 << (130 - 128));
    assert_eq!(bitmap[1], 1 << (200 - 192));
}

#[test]
fn over_budget_the_longest_unchanged_pages_go_cold() {
    let mut f = Fixture::new(64, 2);
    f.capture(&[1]);
    f.capture(&[2]);
    f.capture(&[3]);
    // 1 unchanged for 2 captures, 2 for 1, 3 for 0: 1 goes.
    let (retired, _) = f.capture(&[]);
    assert_eq!(retired, vec![1]);
    assert_eq!(f.t.hot_pages(), 2);
    assert!(f.hot(2).is_some() && f.hot(3).is_some());
}

#[test]
fn many_hot_pages_log_exactly_the_changed_ones() {
    many_hot_pages(Fixture::new(2048 + 64, 2048));
}

/// The helper's chunks join the log in place: still ascending, still
/// exactly the changed pages, with their new bytes.
#[test]
fn many_hot_pages_log_exactly_the_changed_ones_with_the_helper() {
    many_hot_pages(Fixture::with_helper(2048 + 64, 2048));
}

fn many_hot_pages(mut f: Fixture) {
    let n = 2048;
    let all: Vec<u64> = (0..n as u64).collect();
    for &p in &all {
        f.fill(p, 1);
    }
    f.capture(&all);
    // A working set: held like pages that keep coming back (a first
    // hold would retire the unchanged ones after two rounds).
    for h in f.t.hot.iter_mut() {
        h.hold = HOT_EPOCHS;
    }
    let mut rng = Rng(7);
    for round in 0..5u8 {
        let mut changed: Vec<u64> = all.iter().copied().filter(|_| rng.below(4) == 0).collect();
        changed.dedup();
        for &p in &changed {
            // Change one byte somewhere in the page.
            let at = p as usize * PAGE + rng.below(PAGE as u64) as usize;
            f.guest[at] = f.guest[at].wrapping_add(round + 1);
        }
        let (_, c) = f.capture(&[]);
        assert_eq!(c.payload.pfns(), changed, "round {round}");
        for (i, &p) in c.payload.pfns().iter().enumerate() {
            assert_eq!(
                &c.pages[i * PAGE..][..PAGE],
                &f.guest[p as usize * PAGE..][..PAGE]
            );
        }
    }
}
