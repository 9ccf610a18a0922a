//! The swap victim order as a dry run: whether swapping whole sessions out, in the order
//! [`crate::Vmu`]'s `make_room` would pick them, could free enough device blocks. Pure over a
//! list of candidates so the same answer can be checked against the obvious quadratic
//! selection (see the tests).

/// A resident, unpinned session that `make_room` may swap out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    /// `make_room`'s order: lowest `evict_rank`, then least recently used; the slot index
    /// breaks ties, so the order is total.
    pub key: ((u8, u64), usize),
    /// Table entries, i.e. the host slots swapping it out takes.
    pub blocks: usize,
}

/// Whether `need` device blocks can be free, starting from `free` device and `host` host-pool
/// blocks, by swapping out `cands` in key order, each only if it fits in what is left of the
/// host pool and owns an unshared block (`unshared(slot)` counts them; asked only of the
/// sessions reached). The host pool only shrinks, so a session too large for it when reached
/// stays too large: one pass in sorted order is the whole policy. O(n log n).
pub(crate) fn room_possible(
    mut free: usize,
    mut host: usize,
    need: usize,
    mut cands: Vec<Candidate>,
    unshared: impl Fn(usize) -> usize,
) -> bool {
    if free >= need {
        return true;
    }
    cands.sort_unstable_by_key(|c| c.key);
    for c in cands {
        let u = unshared(c.key.1);
        if c.blocks <= host && u > 0 {
            host -= c.blocks;
            free += u;
            if free >= need {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The selection `Vmu::room_possible` used before: find the next candidate by a full scan
    /// each round (O(sessions²) when many must go).
    fn quadratic(mut free: usize, mut host: usize, need: usize, cands: &[Candidate], unshared: &[usize]) -> bool {
        let mut after: Option<((u8, u64), usize)> = None;
        while free < need {
            let mut next: Option<((u8, u64), usize)> = None;
            for c in cands {
                if after.is_some_and(|a| c.key <= a) || next.is_some_and(|n| n <= c.key) {
                    continue;
                }
                next = Some(c.key);
            }
            let Some(key) = next else { return false };
            after = next;
            let c = cands.iter().find(|c| c.key == key).unwrap();
            if c.blocks <= host && unshared[key.1] > 0 {
                host -= c.blocks;
                free += unshared[key.1];
            }
        }
        true
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn same_answers_as_the_quadratic_scan(
            free in 0usize..20,
            host in 0usize..60,
            need in 0usize..80,
            // (rank, last_used, blocks, unshared ≤ blocks, eligible)
            sessions in prop::collection::vec((0u8..3, 0u64..8, 0usize..12, 0usize..12, any::<bool>()), 0..40),
        ) {
            let mut cands = Vec::new();
            let mut unshared = vec![0; sessions.len()];
            for (i, &(rank, used, blocks, u, eligible)) in sessions.iter().enumerate() {
                unshared[i] = u.min(blocks);
                if eligible && blocks > 0 {
                    cands.push(Candidate { key: ((rank, used), i), blocks });
                }
            }
            let old = quadratic(free, host, need, &cands, &unshared);
            // Shuffled input order must not matter.
            cands.reverse();
            let new = room_possible(free, host, need, cands, |i| unshared[i]);
            prop_assert_eq!(old, new);
        }
    }
}
