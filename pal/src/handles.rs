//! The handle table every host keeps per picoprocess.
//!
//! A handle is `generation << 32 | (slot + 1)`: 0 is never valid, and a
//! closed slot's old handles stay invalid after the slot is reused (the
//! generation moves on). Objects are reference counted per
//! DkObjectReference / DkObjectClose.
use crate::{Error, PalResult};
use alloc::sync::Arc;
use alloc::vec::Vec;

struct Slot<T> {
    generation: u32,
    refs: u32,
    object: Option<Arc<T>>,
}

/// Maximum references one handle may hold.
pub const MAX_REFS: u32 = 1 << 20;

pub struct HandleTable<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    live: usize,
    capacity: usize,
}

impl<T> HandleTable<T> {
    /// A table holding at most `capacity` live handles.
    pub fn new(capacity: usize) -> Self {
        HandleTable {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            capacity,
        }
    }

    /// The most live handles the table holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn insert(&mut self, object: Arc<T>) -> PalResult<u64> {
        if self.live >= self.capacity {
            return Err(Error::LimitExceeded);
        }
        let idx = if let Some(i) = self.free.pop() {
            i
        } else {
            self.slots.push(Slot {
                generation: 0,
                refs: 0,
                object: None,
            });
            (self.slots.len() - 1) as u32
        };
        let slot = &mut self.slots[idx as usize];
        slot.generation = slot.generation.wrapping_add(1).max(1);
        slot.refs = 1;
        slot.object = Some(object);
        self.live += 1;
        Ok(((slot.generation as u64) << 32) | (idx as u64 + 1))
    }

    fn slot(&self, h: u64) -> PalResult<(usize, &Slot<T>)> {
        let idx = (h & 0xffff_ffff) as usize;
        let generation = (h >> 32) as u32;
        if idx == 0 {
            return Err(Error::BadHandle);
        }
        let s = self.slots.get(idx - 1).ok_or(Error::BadHandle)?;
        if s.object.is_none() || s.generation != generation {
            return Err(Error::BadHandle);
        }
        Ok((idx - 1, s))
    }

    pub fn get(&self, h: u64) -> PalResult<Arc<T>> {
        Ok(self.slot(h)?.1.object.clone().unwrap())
    }

    pub fn reference(&mut self, h: u64) -> PalResult<()> {
        let (i, _) = self.slot(h)?;
        let s = &mut self.slots[i];
        if s.refs >= MAX_REFS {
            return Err(Error::LimitExceeded);
        }
        s.refs += 1;
        Ok(())
    }

    /// Drop one reference; returns the object if this was the last one.
    pub fn close(&mut self, h: u64) -> PalResult<Option<Arc<T>>> {
        let (i, _) = self.slot(h)?;
        let s = &mut self.slots[i];
        s.refs -= 1;
        if s.refs > 0 {
            return Ok(None);
        }
        let o = s.object.take();
        self.free.push(i as u32);
        self.live -= 1;
        Ok(o)
    }

    /// Every live handle with its references and object, in slot order
    /// (for a checkpoint).
    pub fn entries(&self) -> Vec<(u64, u32, Arc<T>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let o = s.object.as_ref()?;
                Some((
                    ((s.generation as u64) << 32) | (i as u64 + 1),
                    s.refs,
                    o.clone(),
                ))
            })
            .collect()
    }

    /// Put `object` under the given handle number with `refs` references
    /// (a restore rebuilding the table a checkpoint describes): the slot
    /// must be free, the generation not 0, the references 1 to
    /// [`MAX_REFS`], and the table must have room.
    pub fn insert_at(&mut self, h: u64, refs: u32, object: Arc<T>) -> PalResult<()> {
        let idx = (h & 0xffff_ffff) as usize;
        let generation = (h >> 32) as u32;
        if idx == 0 || generation == 0 || refs == 0 || refs > MAX_REFS {
            return Err(Error::InvalidArgument);
        }
        if self.live >= self.capacity || idx > self.capacity.max(1) * 2 + 64 {
            return Err(Error::LimitExceeded);
        }
        while self.slots.len() < idx {
            self.free.push(self.slots.len() as u32);
            self.slots.push(Slot {
                generation: 0,
                refs: 0,
                object: None,
            });
        }
        let slot = &mut self.slots[idx - 1];
        if slot.object.is_some() {
            return Err(Error::AlreadyExists);
        }
        self.free.retain(|&f| f as usize != idx - 1);
        slot.generation = generation;
        slot.refs = refs;
        slot.object = Some(object);
        self.live += 1;
        Ok(())
    }

    /// Every live object (for teardown).
    pub fn drain(&mut self) -> Vec<Arc<T>> {
        self.live = 0;
        self.free.clear();
        let mut out = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(o) = s.object.take() {
                out.push(o);
            }
            self.free.push(i as u32);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn lifecycle() {
        let mut t = HandleTable::new(2);
        let a = t.insert(Arc::new(1)).unwrap();
        let b = t.insert(Arc::new(2)).unwrap();
        assert_eq!(t.insert(Arc::new(3)), Err(Error::LimitExceeded));
        assert_eq!(*t.get(a).unwrap(), 1);
        assert_eq!(t.get(0).err(), Some(Error::BadHandle));
        assert_eq!(t.get(0xdead_0000_0001).err(), Some(Error::BadHandle));
        t.reference(b).unwrap();
        assert!(t.close(b).unwrap().is_none());
        assert!(t.close(b).unwrap().is_some());
        assert_eq!(t.get(b).err(), Some(Error::BadHandle));
        let c = t.insert(Arc::new(4)).unwrap();
        assert_ne!(b, c, "a reused slot gets a new generation");
        assert_eq!(t.get(b).err(), Some(Error::BadHandle));
    }

    #[test]
    fn a_table_is_rebuilt_with_the_same_numbers() {
        let mut t = HandleTable::new(8);
        let a = t.insert(Arc::new(1)).unwrap();
        let b = t.insert(Arc::new(2)).unwrap();
        t.reference(b).unwrap();
        t.close(a).unwrap();
        let c = t.insert(Arc::new(3)).unwrap();
        let mut u = HandleTable::new(8);
        for (h, refs, o) in t.entries() {
            u.insert_at(h, refs, o).unwrap();
        }
        assert_eq!(*u.get(b).unwrap(), 2);
        assert_eq!(*u.get(c).unwrap(), 3);
        assert_eq!(u.get(a).err(), Some(Error::BadHandle));
        assert!(u.close(b).unwrap().is_none(), "two references carried");
        assert_eq!(u.insert_at(c, 1, Arc::new(9)), Err(Error::AlreadyExists));
        assert_eq!(u.insert_at(5, 1, Arc::new(9)), Err(Error::InvalidArgument));
        // Free slots below are used by later inserts.
        let d = u.insert(Arc::new(4)).unwrap();
        assert_eq!(*u.get(d).unwrap(), 4);
    }
}
