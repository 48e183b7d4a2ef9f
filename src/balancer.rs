//! The order in which instances are tried for one request: round-robin through an atomic counter, so that
//! successive requests start at successive instances, then every other instance once, in order.

use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Balancer {
    next: AtomicUsize,
    count: usize,
}

impl Balancer {
    pub fn new(count: usize) -> Balancer {
        Balancer { next: AtomicUsize::new(0), count }
    }

    /// Instance indexes for one request: each exactly once, starting at the next round-robin position.
    pub fn order(&self) -> impl Iterator<Item = usize> {
        let count = self.count;
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count.max(1);
        (0..count).map(move |i| (start + i) % count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_visits_each_once() {
        let b = Balancer::new(3);
        assert_eq!(b.order().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(b.order().collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(b.order().collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(b.order().collect::<Vec<_>>(), [0, 1, 2]);
    }
}
