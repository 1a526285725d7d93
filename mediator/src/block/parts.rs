//! The client requests the engine knows, by key: a slab (a vector of slots
//! and a free list), so the hot path hashes nothing. A key is the slot's
//! index and a sequence number, so a key whose part is gone never names
//! the part that reuses its slot.

pub(crate) struct Parts<Part> {
    slots: Vec<Option<(u64, Part)>>,
    free: Vec<u32>,
    seq: u64,
}

impl<Part> Parts<Part> {
    pub(crate) fn new() -> Parts<Part> {
        Parts {
            slots: Vec::new(),
            free: Vec::new(),
            seq: 0,
        }
    }

    /// Stores `p`; returns its key.
    pub(crate) fn insert(&mut self, p: Part) -> u64 {
        self.seq += 1;
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let key = self.seq << 32 | u64::from(index);
        self.slots[index as usize] = Some((key, p));
        key
    }

    fn slot(&self, key: u64) -> Option<usize> {
        let i = (key & 0xffff_ffff) as usize;
        match self.slots.get(i) {
            Some(Some((k, _))) if *k == key => Some(i),
            _ => None,
        }
    }

    pub(crate) fn get(&self, key: u64) -> Option<&Part> {
        let i = self.slot(key)?;
        self.slots[i].as_ref().map(|(_, p)| p)
    }

    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut Part> {
        let i = self.slot(key)?;
        self.slots[i].as_mut().map(|(_, p)| p)
    }

    pub(crate) fn remove(&mut self, key: u64) -> Option<Part> {
        let i = self.slot(key)?;
        self.free.push(i as u32);
        self.slots[i].take().map(|(_, p)| p)
    }

    /// Every part with its key.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Part)> {
        self.slots.iter().flatten().map(|(k, p)| (*k, p))
    }
}
