//! Rendezvous (highest random weight) hashing: every node scores every key,
//! and the key's owner is the node with the highest score. A key's ranking
//! of the nodes is its fallback order: when the owner is down the next node
//! owns the key, and everybody agrees on that without talking.
//!
//! Adding or removing a node moves only the keys it wins or held (about
//! 1/N of them); the order of any two nodes for a key never depends on the
//! others, so nodes with different peer lists still agree on the nodes they
//! share.
//!
//! The score is the first 8 bytes of SHA-256(node URL, 0, key): stable
//! across Rust versions and platforms (std's `DefaultHasher` is not), and
//! cheap at the scale of a few nodes on the miss path only.

use sha2::{Digest as _, Sha256};

/// The score of `node` (a normalized peer URL) for `key`.
pub(crate) fn weight(node: &str, key: &[u8]) -> u64 {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update([0u8]);
    h.update(key);
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

/// `nodes` in `key`'s order, owner first. `name` gives a node's URL; ties
/// (vanishingly rare) are broken by the URL, so every node ranks alike.
pub(crate) fn rank<'a, T>(nodes: &'a [T], key: &[u8], name: impl Fn(&T) -> &str) -> Vec<&'a T> {
    let mut scored: Vec<(u64, &str, &T)> = nodes
        .iter()
        .map(|n| (weight(name(n), key), name(n), n))
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, _, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:5000")).collect()
    }

    fn owner(nodes: &[String], key: &[u8]) -> String {
        rank(nodes, key, |s| s.as_str())[0].clone()
    }

    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("sha256:{i:064x}").into_bytes())
            .collect()
    }

    #[test]
    fn the_weight_is_stable() {
        // Pinned: the ranking must not change between builds or versions,
        // or a rolling upgrade would move every key.
        assert_eq!(
            weight("http://10.0.0.1:5000", b"sha256:abc"),
            weight("http://10.0.0.1:5000", b"sha256:abc")
        );
        let expect = {
            let d = Sha256::digest(b"http://a:1\0k");
            u64::from_be_bytes(d[..8].try_into().unwrap())
        };
        assert_eq!(weight("http://a:1", b"k"), expect);
        assert_ne!(weight("http://a:1", b"k"), weight("http://a:1", b"l"));
    }

    #[test]
    fn ranking_is_a_permutation_in_the_same_order_everywhere() {
        let n = nodes(5);
        for key in keys(50) {
            let r = rank(&n, &key, |s| s.as_str());
            assert_eq!(r.len(), 5);
            let mut sorted: Vec<&String> = r.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 5);
            // Whatever order the list is given in.
            let mut rev = n.clone();
            rev.reverse();
            assert_eq!(rank(&rev, &key, |s| s.as_str()), r);
            // Two nodes keep their relative order whoever else is there.
            let pair = vec![n[1].clone(), n[3].clone()];
            let rp = rank(&pair, &key, |s| s.as_str());
            let pos = |x: &String| r.iter().position(|y| *y == x).unwrap();
            assert!(pos(rp[0]) < pos(rp[1]));
        }
    }

    #[test]
    fn keys_spread_evenly() {
        let n = nodes(3);
        let ks = keys(30_000);
        let mut counts = [0usize; 3];
        for k in &ks {
            let o = owner(&n, k);
            counts[n.iter().position(|x| *x == o).unwrap()] += 1;
        }
        for c in counts {
            // 10 000 expected each; allow 5 %.
            assert!((9_500..=10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn adding_or_removing_a_node_moves_about_one_nth() {
        let ks = keys(20_000);
        let three = nodes(3);
        let four = nodes(4);
        let moved = ks
            .iter()
            .filter(|k| owner(&three, k) != owner(&four, k))
            .count();
        // A fourth node takes about 1/4 of the keys, all of them its own.
        assert!((4_500..=5_500).contains(&moved), "moved {moved}");
        for k in &ks {
            let (a, b) = (owner(&three, k), owner(&four, k));
            if a != b {
                assert_eq!(b, four[3], "a key moved between old nodes");
            }
        }
        // Removing a node moves only its keys, each to its second choice.
        let two: Vec<String> = vec![three[0].clone(), three[2].clone()];
        for k in &ks {
            let before = rank(&three, k, |s| s.as_str());
            let after = owner(&two, k);
            if *before[0] != three[1] {
                assert_eq!(*before[0], after, "a key not on the removed node moved");
            } else {
                assert_eq!(*before[1], after, "the key did not fall to its next owner");
            }
        }
    }
}
