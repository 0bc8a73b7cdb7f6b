//! Who owns which task, in memory: the status read's ownership check without the ledger.
//!
//! Ownership never changes once recorded, so the ledger need not be asked on every read. The
//! index holds, for the newest `[cache] max_owners` tasks (those created or read through this
//! gateway, and at start the newest in the ledger), the owning team and whether the task is
//! closed. A task it does not hold is looked up in the ledger, which stays the only source of
//! truth: the index can forget, but never says a team owns a task it does not.
//!
//! An entry is 16 bytes: 12 of SHA-256 of the task id, and the team's number with the closed flag;
//! in hash tables that grow in powers of two, 20 to 40 bytes of memory (36 MiB for a full index
//! of a million). Two task ids share those 12 bytes with odds of about one in 10²³ per read at a
//! million tasks, and as task ids are the upstream's, no client can choose one to make them meet.
//! Memory is bounded by two generations of at most half the capacity each: new entries go to
//! the young one, and when it is full the old one is dropped and the young one takes its place.
//! A general-purpose cache (quick_cache) takes 73 bytes for an entry of this size, with none of
//! the gateway's use for its eviction policy: the owners worth keeping are the newest.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU32, AtomicUsize, Ordering},
};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use sha2::{Digest, Sha256};

use crate::ledger::{LedgerStore, StoreError};

type Key = [u8; 12];

/// What the index knows of a task, for the team that asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The team owns it; `closed` if it was settled, released or expired when last recorded.
    Owned { closed: bool },
    /// Another team owns it.
    NotOwned,
    /// Not in the index: ask the ledger.
    Unknown,
}

pub struct OwnershipIndex {
    generations: ArcSwap<Generations>,
    /// Most entries in one generation; 0 turns the index off.
    generation_size: usize,
    /// Serialises rotations, so two full young generations are never both made old.
    rotation: Mutex<()>,
    /// Teams by name, as the small numbers entries hold; teams are few, and never forgotten.
    teams: DashMap<Box<str>, u32>,
    next_team: AtomicU32,
}

struct Generations {
    young: Arc<Generation>,
    old: Option<Arc<Generation>>,
}

struct Generation {
    owners: DashMap<Key, u32>,
    len: AtomicUsize,
}

impl Generation {
    /// Empty, and grown as it fills: a gateway with few tasks holds little.
    fn empty() -> Arc<Self> {
        Arc::new(Generation {
            owners: DashMap::new(),
            len: AtomicUsize::new(0),
        })
    }
}

/// The team number takes the upper 31 bits of an entry, the closed flag the lowest.
const MAX_TEAMS: u32 = 1 << 31;

fn key(task_id: &str) -> Key {
    let digest = Sha256::digest(task_id.as_bytes());
    digest[..12].try_into().expect("SHA-256 has 32 bytes")
}

impl OwnershipIndex {
    /// An index of at most about `capacity` tasks (rounded up to an even number); 0 keeps none.
    pub fn new(capacity: u64) -> Self {
        let generation_size = usize::try_from(capacity.div_ceil(2)).unwrap_or(usize::MAX);
        OwnershipIndex {
            generations: ArcSwap::from_pointee(Generations {
                young: Generation::empty(),
                old: None,
            }),
            generation_size,
            rotation: Mutex::new(()),
            teams: DashMap::new(),
            next_team: AtomicU32::new(0),
        }
    }

    pub fn lookup(&self, task_id: &str, team: &str) -> Lookup {
        if self.generation_size == 0 {
            return Lookup::Unknown;
        }
        let key = key(task_id);
        let generations = self.generations.load();
        let entry = generations.young.owners.get(&key).map(|e| *e).or_else(|| {
            let old = generations.old.as_ref()?;
            old.owners.get(&key).map(|e| *e)
        });
        let Some(entry) = entry else {
            return Lookup::Unknown;
        };
        match self.teams.get(team) {
            Some(number) if *number == entry >> 1 => Lookup::Owned {
                closed: entry & 1 == 1,
            },
            _ => Lookup::NotOwned,
        }
    }

    /// Remembers who owns the task, and whether it is closed (a closed task stays closed).
    pub fn record(&self, task_id: &str, team: &str, closed: bool) {
        self.insert(task_id, team, closed, true);
    }

    /// As `record`, but leaves a task the index already holds as it is: for filling the index
    /// from the ledger while live reads and generations record newer facts.
    pub fn record_if_absent(&self, task_id: &str, team: &str, closed: bool) {
        self.insert(task_id, team, closed, false);
    }

    /// Tasks held, both generations together.
    pub fn len(&self) -> usize {
        let generations = self.generations.load();
        let old = generations
            .old
            .as_ref()
            .map_or(0, |g| g.len.load(Ordering::Relaxed));
        generations.young.len.load(Ordering::Relaxed) + old
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, task_id: &str, team: &str, closed: bool, overwrite: bool) {
        if self.generation_size == 0 {
            return;
        }
        let Some(team) = self.team_number(team) else {
            return;
        };
        let key = key(task_id);
        let entry = team << 1 | u32::from(closed);
        let mut generations = self.generations.load_full();
        let held = |g: &Generation| g.owners.get(&key).map(|e| *e);
        let known = held(&generations.young).or_else(|| generations.old.as_deref().and_then(held));
        match known {
            Some(_) if !overwrite => return,
            // Nothing new: closed is final, and the owner never changes.
            Some(known) if known == entry || known & 1 == 1 => return,
            _ => {}
        }
        if generations.young.len.load(Ordering::Relaxed) >= self.generation_size {
            generations = self.rotate(generations);
        }
        if generations.young.owners.insert(key, entry).is_none() {
            generations.young.len.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops the old generation and makes the full young one old; returns the generations to
    /// insert into (another thread's, if it rotated first).
    fn rotate(&self, full: Arc<Generations>) -> Arc<Generations> {
        let _rotating = self.rotation.lock().expect("rotation lock");
        let current = self.generations.load_full();
        if !Arc::ptr_eq(&current, &full) {
            return current;
        }
        let next = Arc::new(Generations {
            young: Generation::empty(),
            old: Some(full.young.clone()),
        });
        self.generations.store(next.clone());
        next
    }

    fn team_number(&self, team: &str) -> Option<u32> {
        if let Some(number) = self.teams.get(team) {
            return Some(*number);
        }
        let number = *self
            .teams
            .entry(team.into())
            .or_insert_with(|| self.next_team.fetch_add(1, Ordering::Relaxed));
        (number < MAX_TEAMS).then_some(number)
    }
}

/// Tasks read from the ledger per page while filling the index.
const FILL_PAGE: usize = 10_000;

impl OwnershipIndex {
    /// Fills the index with the newest tasks of the ledger, as many as it holds, oldest first so
    /// that the newest end up in the young generation. Returns how many it read.
    pub async fn fill_from(&self, ledger: &dyn LedgerStore) -> Result<u64, StoreError> {
        if self.generation_size == 0 {
            return Ok(0);
        }
        let capacity = u64::try_from(self.generation_size).unwrap_or(u64::MAX) * 2;
        let mut next = Some(ledger.newest_tasks_start(capacity).await?);
        let mut read = 0;
        while let Some(from) = next {
            let (tasks, then) = ledger.tasks_from(from, FILL_PAGE).await?;
            for task in &tasks {
                self.record_if_absent(&task.task_id, &task.team, task.state.is_closed());
            }
            read += tasks.len() as u64;
            next = then;
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_is_told_apart_from_other_teams_and_from_unknown_tasks() {
        let index = OwnershipIndex::new(100);
        index.record("ta-1", "design", false);
        assert_eq!(
            index.lookup("ta-1", "design"),
            Lookup::Owned { closed: false }
        );
        assert_eq!(index.lookup("ta-1", "ads"), Lookup::NotOwned);
        // A team the index has never seen owns nothing in it.
        assert_eq!(index.lookup("ta-1", "nobody-yet"), Lookup::NotOwned);
        assert_eq!(index.lookup("ta-2", "design"), Lookup::Unknown);
    }

    #[test]
    fn closed_is_final_and_filling_never_overrules_a_live_record() {
        let index = OwnershipIndex::new(100);
        index.record("ta-1", "design", false);
        index.record("ta-1", "design", true);
        assert_eq!(
            index.lookup("ta-1", "design"),
            Lookup::Owned { closed: true }
        );
        index.record("ta-1", "design", false);
        assert_eq!(
            index.lookup("ta-1", "design"),
            Lookup::Owned { closed: true }
        );

        index.record("ta-2", "design", true);
        index.record_if_absent("ta-2", "design", false);
        assert_eq!(
            index.lookup("ta-2", "design"),
            Lookup::Owned { closed: true }
        );
        index.record_if_absent("ta-3", "ads", false);
        assert_eq!(index.lookup("ta-3", "ads"), Lookup::Owned { closed: false });
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn it_holds_the_newest_tasks_and_never_more_than_its_capacity() {
        let index = OwnershipIndex::new(1_000);
        for n in 0..10_000 {
            index.record(&format!("ta-{n}"), "design", false);
            assert!(index.len() <= 1_000, "{} held after {n}", index.len());
        }
        // At least the newest generation's worth, whatever the point of rotation.
        for n in 9_500..10_000 {
            let lookup = index.lookup(&format!("ta-{n}"), "design");
            assert_eq!(lookup, Lookup::Owned { closed: false }, "ta-{n}");
        }
        let held = (0..10_000)
            .filter(|n| index.lookup(&format!("ta-{n}"), "design") != Lookup::Unknown)
            .count();
        assert_eq!(held, index.len());
        assert!(held >= 500, "only {held} held");
        assert_eq!(index.lookup("ta-0", "design"), Lookup::Unknown);
    }

    #[test]
    fn filled_with_its_capacity_in_order_it_keeps_all_of_it() {
        // As at start: the newest `capacity` tasks of the ledger, oldest first.
        let index = OwnershipIndex::new(1_000);
        for n in 0..1_000 {
            index.record_if_absent(&format!("ta-{n}"), "design", false);
        }
        assert_eq!(index.len(), 1_000);
        assert!((0..1_000).all(|n| index.lookup(&format!("ta-{n}"), "design") != Lookup::Unknown));
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let index = OwnershipIndex::new(0);
        index.record("ta-1", "design", false);
        assert_eq!(index.lookup("ta-1", "design"), Lookup::Unknown);
        assert!(index.is_empty());
    }
}
