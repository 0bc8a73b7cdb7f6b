//! Who owns which task, in memory: the status read's ownership check without the ledger.
//!
//! Ownership never changes once recorded, so the ledger need not be asked on every read. The
//! index holds, for the newest `[cache] max_owners` tasks (those created or read through this
//! gateway, and at start the newest in the ledger), the owning team and whether the task is
//! closed. A task it does not hold is looked up in the ledger, which stays the only source of
//! truth: the index can forget, but never says a team owns a task it does not.
//!
//! An entry is 16 bytes: 12 of SHA-256 of the task id, and the team's number with the closed flag.
//! Two task ids share those 12 bytes with odds of about one in 10²³ per read at a million tasks,
//! and as task ids are the upstream's, no client can choose one to make them meet.
//!
//! Memory is bounded by two generations of at most half the capacity each: new entries go to
//! the young one, and when it is full the old one is dropped and the young one takes its place.
//! Each generation's table is sized for a full one when it starts, so it never grows (a growing
//! table leaves its old copies behind in the allocator); memory is taken as entries are written.
//! A general-purpose cache would spend several times as much on each entry for an eviction
//! policy the gateway has no use for: the owners worth keeping are simply the newest.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{PoisonError, RwLock};

use nohash_hasher::BuildNoHashHasher;
use sha2::{Digest, Sha256};

use crate::ledger::{StoreError, Tasks};

/// The first 12 bytes of SHA-256 of a task id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key([u8; 12]);

/// Hashed as its first eight bytes, which are already spread evenly: a keyed hash (SipHash, on
/// every status read) would guard against chosen keys, and no client chooses a task id.
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (first, _) = self.0.split_first_chunk::<8>().expect("12 bytes");
        state.write_u64(u64::from_ne_bytes(*first));
    }
}

impl nohash_hasher::IsEnabled for Key {}

type Entries = HashMap<Key, u32, BuildNoHashHasher<Key>>;

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
    /// One lock for all of it: a lookup holds it for two map reads, a record for a few more.
    generations: RwLock<Generations>,
    /// Most entries in one generation; 0 turns the index off.
    generation_size: usize,
}

struct Generations {
    young: Entries,
    old: Entries,
    /// Teams by name, as the small numbers entries hold; teams are few, and never forgotten.
    teams: HashMap<Box<str>, u32>,
}

/// The team number takes the upper 31 bits of an entry, the closed flag the lowest.
const MAX_TEAMS: usize = 1 << 31;

fn key(task_id: &str) -> Key {
    let digest = Sha256::digest(task_id.as_bytes());
    Key(digest[..12].try_into().expect("SHA-256 has 32 bytes"))
}

impl Generations {
    fn get(&self, key: &Key) -> Option<u32> {
        self.young.get(key).or_else(|| self.old.get(key)).copied()
    }

    fn team_number(&mut self, team: &str) -> Option<u32> {
        if let Some(number) = self.teams.get(team) {
            return Some(*number);
        }
        let number = u32::try_from(self.teams.len())
            .ok()
            .filter(|n| (*n as usize) < MAX_TEAMS)?;
        self.teams.insert(team.into(), number);
        Some(number)
    }
}

impl OwnershipIndex {
    /// An index of at most `capacity` tasks (rounded up to an even number); 0 keeps none.
    pub fn new(capacity: u64) -> Self {
        let generation_size = usize::try_from(capacity.div_ceil(2)).unwrap_or(usize::MAX);
        OwnershipIndex {
            generations: RwLock::new(Generations {
                young: Entries::with_capacity_and_hasher(generation_size, Default::default()),
                old: Entries::default(),
                teams: HashMap::new(),
            }),
            generation_size,
        }
    }

    pub fn lookup(&self, task_id: &str, team: &str) -> Lookup {
        if self.generation_size == 0 {
            return Lookup::Unknown;
        }
        let key = key(task_id);
        let generations = self
            .generations
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = generations.get(&key) else {
            return Lookup::Unknown;
        };
        match generations.teams.get(team) {
            Some(number) if *number == entry >> 1 => Lookup::Owned {
                closed: entry & 1 == 1,
            },
            // Including a team the index has never seen: it owns nothing in it.
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
        let generations = self
            .generations
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        generations.young.len() + generations.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, task_id: &str, team: &str, closed: bool, overwrite: bool) {
        if self.generation_size == 0 {
            return;
        }
        let key = key(task_id);
        let mut generations = self
            .generations
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(team) = generations.team_number(team) else {
            return;
        };
        let entry = team << 1 | u32::from(closed);
        match generations.get(&key) {
            Some(_) if !overwrite => return,
            // Nothing new: closed is final, and the owner never changes.
            Some(known) if known == entry || known & 1 == 1 => return,
            _ => {}
        }
        if !generations.young.contains_key(&key) && generations.young.len() >= self.generation_size
        {
            // The old generation goes before the next young one is made, so that three never
            // exist at once.
            let full = std::mem::take(&mut generations.young);
            drop(std::mem::replace(&mut generations.old, full));
            generations.young =
                Entries::with_capacity_and_hasher(self.generation_size, Default::default());
        }
        generations.young.insert(key, entry);
    }
}

/// Tasks read from the ledger per page while filling the index.
const FILL_PAGE: usize = 1_000;

impl OwnershipIndex {
    /// Fills the index with the newest tasks of the ledger, as many as it holds, oldest first so
    /// that the newest end up in the young generation. Returns how many it read.
    pub async fn fill_from(&self, ledger: &dyn Tasks) -> Result<u64, StoreError> {
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
