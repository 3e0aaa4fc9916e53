//! Which sequence slot a new request takes: the free one whose cached tokens share the
//! longest prefix with its prompt, else the least recently used free one.

/// A free slot as the chooser sees it.
pub(crate) struct Candidate<'a, T> {
    /// The slot's index.
    pub index: usize,
    /// The tokens in the slot's KV cache.
    pub cached: &'a [T],
    /// When the slot was last used (larger is later).
    pub last_used: u64,
}

/// How many leading tokens `a` and `b` share.
pub(crate) fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The slot for `prompt` among `free`, with the length of the prefix it already holds;
/// `None` when no slot is free.
pub(crate) fn choose<'a, T: PartialEq + 'a>(
    free: impl IntoIterator<Item = Candidate<'a, T>>,
    prompt: &[T],
) -> Option<(usize, usize)> {
    // Longest shared prefix first; among equals (zero included) the least recently used.
    free.into_iter()
        .map(|c| (c.index, common_prefix(c.cached, prompt), c.last_used))
        .min_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)))
        .map(|(index, shared, _)| (index, shared))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(index: usize, cached: &[u32], last_used: u64) -> Candidate<'_, u32> {
        Candidate { index, cached, last_used }
    }

    #[test]
    fn prefix() {
        assert_eq!(common_prefix::<u32>(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2]), 2);
        assert_eq!(common_prefix(&[5], &[1]), 0);
    }

    #[test]
    fn longest_prefix_wins_then_least_recently_used() {
        let prompt = [1, 2, 3, 4];
        let (a, b, c) = ([1, 2, 9], [1, 2, 3, 7], [9]);
        let got = choose([cand(0, &a, 1), cand(1, &b, 5), cand(2, &c, 0)], &prompt);
        assert_eq!(got, Some((1, 3)));
        // Nothing shared: the least recently used.
        let got = choose([cand(0, &c, 4), cand(1, &[], 2), cand(2, &c, 3)], &prompt);
        assert_eq!(got, Some((1, 0)));
        // Equal prefixes: the least recently used of them.
        let got = choose([cand(0, &a, 4), cand(1, &a, 2), cand(2, &c, 0)], &prompt);
        assert_eq!(got, Some((1, 2)));
        assert_eq!(choose::<u32>([], &prompt), None);
    }
}
