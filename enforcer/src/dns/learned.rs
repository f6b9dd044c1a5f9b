//! Addresses learned from DNS answers, per profile and name key, each until
//! its answer expires. Bounded: past the cap, the entries closest to expiry
//! are evicted first, and every eviction is counted. Pure (time is passed
//! in), so it is tested without a clock or a kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

/// One address learned for one rule's name key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    profile: String,
    addr: IpAddr,
    key: String,
}

#[derive(Clone, Debug)]
struct Entry {
    expires: Instant,
    /// The name the answer was for, for log lines about the address.
    name: String,
}

#[derive(Debug)]
pub struct Learned {
    entries: BTreeMap<Slot, Entry>,
    by_expiry: BTreeSet<(Instant, Slot)>,
    cap: usize,
    /// Entries dropped before they expired to stay under the cap.
    pub evicted: u64,
}

impl Learned {
    pub fn new(cap: usize) -> Learned {
        Learned {
            entries: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
            cap: cap.max(1),
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Learn that `name` (filed under `key` of `profile`) has `addr` until
    /// `expires`; an entry already known keeps the later expiry. Returns the
    /// profiles whose address sets changed (this one if the entry is new,
    /// and any that lost an entry to the cap); empty if it was known.
    pub fn learn(
        &mut self,
        profile: &str,
        key: &str,
        name: &str,
        addr: IpAddr,
        expires: Instant,
    ) -> BTreeSet<String> {
        let slot = Slot {
            profile: profile.to_owned(),
            addr,
            key: key.to_owned(),
        };
        let mut changed = BTreeSet::new();
        if let Some(entry) = self.entries.get_mut(&slot) {
            name.clone_into(&mut entry.name);
            if expires > entry.expires {
                self.by_expiry.remove(&(entry.expires, slot.clone()));
                entry.expires = expires;
                self.by_expiry.insert((expires, slot));
            }
            return changed;
        }
        while self.entries.len() >= self.cap {
            let Some((_, oldest)) = self.by_expiry.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
            self.evicted += 1;
            changed.insert(oldest.profile);
        }
        self.by_expiry.insert((expires, slot.clone()));
        self.entries.insert(
            slot,
            Entry {
                expires,
                name: name.to_owned(),
            },
        );
        changed.insert(profile.to_owned());
        changed
    }

    /// Forget one entry (undoing a `learn` whose rules could not be
    /// installed).
    pub fn forget(&mut self, profile: &str, key: &str, addr: IpAddr) {
        let slot = Slot {
            profile: profile.to_owned(),
            addr,
            key: key.to_owned(),
        };
        if let Some(entry) = self.entries.remove(&slot) {
            self.by_expiry.remove(&(entry.expires, slot));
        }
    }

    /// Drop every entry expired at `now`; returns the profiles that lost any.
    pub fn expire(&mut self, now: Instant) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        while let Some((expires, _)) = self.by_expiry.first() {
            if *expires > now {
                break;
            }
            let Some((_, slot)) = self.by_expiry.pop_first() else {
                break;
            };
            self.entries.remove(&slot);
            changed.insert(slot.profile);
        }
        changed
    }

    /// The addresses learned for `profile`, by name key.
    pub fn addresses(&self, profile: &str) -> BTreeMap<String, Vec<IpAddr>> {
        let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for slot in self.profile_slots(profile) {
            out.entry(slot.key.clone()).or_default().push(slot.addr);
        }
        out
    }

    /// The name an address of `profile` was last learned for.
    pub fn name_of(&self, profile: &str, addr: IpAddr) -> Option<&str> {
        let start = Slot {
            profile: profile.to_owned(),
            addr,
            key: String::new(),
        };
        self.entries
            .range(start..)
            .next()
            .filter(|(slot, _)| slot.profile == profile && slot.addr == addr)
            .map(|(_, entry)| entry.name.as_str())
    }

    fn profile_slots<'a>(&'a self, profile: &'a str) -> impl Iterator<Item = &'a Slot> {
        self.entries
            .keys()
            .skip_while(move |s| s.profile.as_str() < profile)
            .take_while(move |s| s.profile == profile)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn learns_expires_and_reports_changes() {
        let t0 = Instant::now();
        let mut l = Learned::new(100);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            l.learn("p", "*.a.test", "x.a.test", ip("127.0.0.2"), later),
            BTreeSet::from(["p".to_owned()])
        );
        // Known again: no change, expiry extended.
        assert!(
            l.learn(
                "p",
                "*.a.test",
                "x.a.test",
                ip("127.0.0.2"),
                later + Duration::from_secs(5)
            )
            .is_empty()
        );
        l.learn("q", "b.test", "b.test", ip("::1"), later);
        assert_eq!(
            l.addresses("p"),
            BTreeMap::from([("*.a.test".to_owned(), vec![ip("127.0.0.2")])])
        );
        assert_eq!(l.name_of("p", ip("127.0.0.2")), Some("x.a.test"));
        assert_eq!(l.name_of("q", ip("127.0.0.2")), None);
        assert_eq!(l.expire(later), BTreeSet::from(["q".to_owned()]));
        assert_eq!(l.len(), 1);
        assert_eq!(
            l.expire(later + Duration::from_secs(5)),
            BTreeSet::from(["p".to_owned()])
        );
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn stays_under_its_cap_evicting_the_soonest_to_expire() {
        let t0 = Instant::now();
        let mut l = Learned::new(3);
        for i in 0..10u8 {
            l.learn(
                "p",
                "*.flood.test",
                &format!("n{i}.flood.test"),
                IpAddr::from([127, 1, 0, i]),
                t0 + Duration::from_secs(u64::from(100 - i)),
            );
            assert!(l.len() <= 3);
        }
        assert_eq!(l.evicted, 7);
        // Each newcomer evicted the entry closest to expiry before it.
        let kept = &l.addresses("p")["*.flood.test"];
        assert_eq!(
            kept,
            &vec![ip("127.1.0.0"), ip("127.1.0.1"), ip("127.1.0.9")]
        );
    }

    #[test]
    fn forget_undoes_a_learn() {
        let t0 = Instant::now();
        let mut l = Learned::new(10);
        l.learn("p", "k", "k", ip("127.0.0.9"), t0);
        l.forget("p", "k", ip("127.0.0.9"));
        assert_eq!(l.len(), 0);
        assert!(l.expire(t0 + Duration::from_secs(1)).is_empty());
    }
}
