use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::ModelError;

/// How a [`KvCache`] stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvFormat {
    /// 32-bit floats: exact.
    #[default]
    F32,
    /// 16-bit floats (IEEE half): half the memory and half the bytes the attention reads per
    /// step, at a rounding of about 3 decimal digits on every cached key and value.
    F16,
}

impl std::str::FromStr for KvFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => Err(format!(
                "unknown KV cache format {other:?} (expected f32 or f16)"
            )),
        }
    }
}

/// Keys and values of every layer for a batch of sequences that share one length.
///
/// Each layer holds two flat buffers laid out `[row][head][position][head_dim]`, with room for
/// `capacity` positions per row, so a decode step writes its keys and values in place and the
/// attention kernel reads each head's keys contiguously. Buffers are sized once (give the final
/// length to [`crate::Gpt2Model::new_cache_with_capacity`]) and grow by doubling otherwise.
///
/// A row's storage is found through `slots` (sequence → storage row), so that
/// [`KvCache::reorder`] (one prompt forked into several return sequences, beams after a step)
/// renames storage rows instead of moving them: only a row taken by a second sequence (a fork)
/// is copied, and only its positions in use that differ from what the row it lands in holds
/// (each position remembers which write produced it).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    seq_len: usize,
    rows: usize,
    /// `slots[row]` is the storage row holding sequence `row`: a permutation of `0..rows`.
    slots: Vec<usize>,
    origins: Origins,
    capacity: usize,
    n_head: usize,
    head_dim: usize,
    format: KvFormat,
}

/// Which write produced each committed position of each storage row, so that a fork copies only
/// the positions where its source and its destination differ.
///
/// Every committed position gets a fresh id; a copy carries the ids with the values. Two storage
/// rows holding the same id at a position hold the same bits there, in every layer and head.
/// Writes only ever go past the committed positions and a copy covers them all, so the positions
/// where two rows agree are always a prefix. Beams share their history up to where they parted
/// (and the whole prompt), so a fork mostly copies only the last few positions.
#[derive(Debug, Clone, Default)]
struct Origins {
    /// `ids[slot][position]`, for the committed positions of every storage row.
    ids: Vec<Vec<u64>>,
    next: u64,
}

impl Origins {
    /// Gives every storage row in `0..rows` fresh ids up to `positions` (ids already there stay).
    fn extend(&mut self, rows: usize, positions: usize) {
        self.ids.resize_with(rows.max(self.ids.len()), Vec::new);
        for ids in &mut self.ids[..rows] {
            ids.truncate(positions);
            while ids.len() < positions {
                ids.push(self.next);
                self.next += 1;
            }
        }
    }

    /// How many leading positions storage rows `a` and `b` hold the same values at.
    fn shared(&self, a: usize, b: usize) -> usize {
        match (self.ids.get(a), self.ids.get(b)) {
            (Some(a), Some(b)) => a.iter().zip(b).take_while(|(x, y)| x == y).count(),
            _ => 0,
        }
    }

    /// Records that storage row `to` now holds what `from` does.
    fn copy(&mut self, from: usize, to: usize) {
        let ids = self.ids.get(from).cloned().unwrap_or_default();
        if to >= self.ids.len() {
            self.ids.resize_with(to + 1, Vec::new);
        }
        self.ids[to] = ids;
    }
}

#[derive(Debug, Clone)]
struct LayerCache {
    k: KvBuffer,
    v: KvBuffer,
}

/// One flat buffer of keys or values, in the cache's format.
#[derive(Debug, Clone)]
pub(crate) enum KvBuffer {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// One head's keys and values in one row's storage, mutable: `capacity · head_dim` each.
pub(crate) type HeadBuffers<'a, T> = (&'a mut [T], &'a mut [T]);

/// A cached value type: f32 or f16, read back as f32.
pub(crate) trait KvElement: Copy + Default + Send + Sync {
    /// The format whose buffers hold this type: SIMD kernels pick their loads by it, so a new
    /// 16-bit format (bf16) cannot be mistaken for f16 by its size.
    const FORMAT: KvFormat;

    fn to_f32(self) -> f32;

    /// The slice itself when it already holds f32 (so a kernel reads it without a copy).
    fn as_f32_slice(values: &[Self]) -> Option<&[f32]>;

    /// The buffer's values when it holds this type, mutable.
    fn in_buffer_mut(buffer: &mut KvBuffer) -> Option<&mut [Self]>;

    /// Stores `source` into `to` (of the same length), rounded to this type as
    /// [`KvCache::store`] rounds it.
    fn store_from_f32(to: &mut [Self], source: &[f32]);

    /// `len` zeros from a zeroed allocation (`calloc`), whose pages the kernel faults in as they
    /// are first written instead of all at once.
    fn zeroed(len: usize) -> Vec<Self>;
}

impl KvElement for f32 {
    const FORMAT: KvFormat = KvFormat::F32;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn as_f32_slice(values: &[Self]) -> Option<&[f32]> {
        Some(values)
    }

    fn in_buffer_mut(buffer: &mut KvBuffer) -> Option<&mut [Self]> {
        match buffer {
            KvBuffer::F32(values) => Some(values),
            KvBuffer::F16(_) => None,
        }
    }

    fn store_from_f32(to: &mut [Self], source: &[f32]) {
        to.copy_from_slice(source);
    }

    fn zeroed(len: usize) -> Vec<Self> {
        vec![0.0; len]
    }
}

impl KvElement for f16 {
    const FORMAT: KvFormat = KvFormat::F16;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    fn as_f32_slice(_: &[Self]) -> Option<&[f32]> {
        None
    }

    fn in_buffer_mut(buffer: &mut KvBuffer) -> Option<&mut [Self]> {
        match buffer {
            KvBuffer::F16(values) => Some(values),
            KvBuffer::F32(_) => None,
        }
    }

    fn store_from_f32(to: &mut [Self], source: &[f32]) {
        to.convert_from_f32_slice(source);
    }

    fn zeroed(len: usize) -> Vec<Self> {
        // `vec![f16::ZERO; n]` writes every value; zero bits are f16's +0.
        half::vec::HalfBitsVecExt::reinterpret_into(vec![0u16; len])
    }
}

/// Applies `$body` to the buffer's vector, whatever its element type.
macro_rules! with_buffer {
    ($buffer:expr, $values:ident => $body:expr) => {
        match $buffer {
            KvBuffer::F32($values) => $body,
            KvBuffer::F16($values) => $body,
        }
    };
}

impl KvBuffer {
    fn empty(format: KvFormat) -> Self {
        match format {
            KvFormat::F32 => Self::F32(Vec::new()),
            KvFormat::F16 => Self::F16(Vec::new()),
        }
    }

    pub(crate) fn len(&self) -> usize {
        with_buffer!(self, values => values.len())
    }

    fn bytes(&self) -> usize {
        with_buffer!(self, values => values.capacity() * element_size(values))
    }

    /// Grows or shrinks the buffer to `len` values (new ones zero). A buffer growing from nothing
    /// is allocated zeroed (`calloc`), whose fresh pages the kernel faults in as positions are
    /// written: zeroing a 1,000-token prompt's 74 MB f32 cache in its first chunk held a running
    /// stream's step for about 40 ms (`prefill_stall.py`'s longest gap, f32: 56–73 ms → 37 ms,
    /// 2-vCPU EPYC); f16 buffers are allocated as zeroed 16-bit words.
    fn resize(&mut self, len: usize) {
        with_buffer!(self, values => {
            if values.is_empty() {
                *values = KvElement::zeroed(len);
            } else {
                values.resize(len, Default::default());
            }
        })
    }

    /// Stores `source` (f32) at `at`, rounding to the buffer's format (F16C instructions where
    /// the CPU has them).
    fn write(&mut self, at: usize, source: &[f32]) {
        let range = at..at + source.len();
        match self {
            Self::F32(values) => f32::store_from_f32(&mut values[range], source),
            Self::F16(values) => f16::store_from_f32(&mut values[range], source),
        }
    }

    /// Appends `len` values from `at`, as f32, to `out`.
    #[cfg(test)]
    pub(crate) fn read_into(&self, at: usize, len: usize, out: &mut Vec<f32>) {
        match self {
            Self::F32(values) => out.extend_from_slice(&values[at..at + len]),
            Self::F16(values) => {
                let start = out.len();
                out.resize(start + len, 0.0);
                values[at..at + len].convert_to_f32_slice(&mut out[start..]);
            }
        }
    }
}

fn element_size<T>(_: &[T]) -> usize {
    std::mem::size_of::<T>()
}

impl KvCache {
    pub(crate) fn new(
        n_layer: usize,
        n_head: usize,
        head_dim: usize,
        capacity: usize,
        format: KvFormat,
    ) -> Self {
        let layer = LayerCache {
            k: KvBuffer::empty(format),
            v: KvBuffer::empty(format),
        };
        Self {
            layers: vec![layer; n_layer],
            seq_len: 0,
            rows: 0,
            slots: Vec::new(),
            origins: Origins::default(),
            capacity,
            n_head,
            head_dim,
            format,
        }
    }

    /// How many leading committed positions every row holds the same keys and values at: the
    /// prompt the rows were forked from, and the history beams share. 0 for fewer than two rows.
    pub(crate) fn shared_prefix(&self) -> usize {
        if self.rows < 2 {
            return 0;
        }
        (1..self.rows)
            .map(|r| self.origins.shared(self.slots[0], self.slots[r]))
            .min()
            .unwrap_or(0)
            .min(self.seq_len)
    }

    /// Number of positions cached per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Rows (sequences) the buffers are laid out for, including during a step before
    /// [`Self::commit`].
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Whether this cache was made for a model of `n_layer` layers of `n_head` heads of
    /// `head_dim`.
    pub(crate) fn fits(&self, n_layer: usize, n_head: usize, head_dim: usize) -> bool {
        self.layers.len() == n_layer && self.n_head == n_head && self.head_dim == head_dim
    }

    /// Records that every row now holds `positions` positions (after a forward pass wrote them).
    pub(crate) fn commit(&mut self, positions: usize) {
        debug_assert!(positions <= self.capacity);
        self.origins.extend(self.rows, positions);
        self.seq_len = positions;
    }

    /// Stores the keys and values of every head of `row` at `position` in `layer`: `keys` and
    /// `values` are `(n_head, head_dim)`, as one row of the attention projection lays them out.
    pub(crate) fn store(
        &mut self,
        layer: usize,
        row: usize,
        position: usize,
        keys: &[f32],
        values: &[f32],
    ) {
        let d = self.head_dim;
        debug_assert!(keys.len() == self.n_head * d && values.len() == keys.len());
        for head in 0..self.n_head {
            let at = self.offset(row, head, position);
            let entry = &mut self.layers[layer];
            entry.k.write(at, &keys[head * d..(head + 1) * d]);
            entry.v.write(at, &values[head * d..(head + 1) * d]);
        }
    }

    /// Layer `layer`'s keys and values of every row and head, `(row, head)` in order, each the
    /// `capacity · head_dim` values of that head in the row's storage, mutable: a decode step's
    /// attention writes each head's new position and reads it back in the same task. `None`
    /// unless the cache holds `T`.
    pub(crate) fn heads_mut<T: KvElement>(
        &mut self,
        layer: usize,
    ) -> Option<Vec<HeadBuffers<'_, T>>> {
        let (n_head, span) = (self.n_head, self.capacity * self.head_dim);
        if span == 0 {
            return None;
        }
        let slots = self.slots.get(..self.rows)?;
        let LayerCache { k, v } = self.layers.get_mut(layer)?;
        let mut keys: Vec<Option<&mut [T]>> =
            T::in_buffer_mut(k)?.chunks_mut(span).map(Some).collect();
        let mut values: Vec<Option<&mut [T]>> =
            T::in_buffer_mut(v)?.chunks_mut(span).map(Some).collect();
        let mut heads = Vec::with_capacity(slots.len() * n_head);
        for &slot in slots {
            for head in 0..n_head {
                let at = slot * n_head + head;
                heads.push((keys.get_mut(at)?.take()?, values.get_mut(at)?.take()?));
            }
        }
        Some(heads)
    }

    /// The keys and values buffers of `layer`, laid out as [`Self::offset`] says.
    pub(crate) fn buffers(&self, layer: usize) -> (&KvBuffer, &KvBuffer) {
        let entry = &self.layers[layer];
        (&entry.k, &entry.v)
    }

    /// Number of sequences cached, `None` while empty.
    pub fn batch_size(&self) -> Option<usize> {
        (self.seq_len > 0).then_some(self.rows)
    }

    /// Positions each row has room for before the buffers grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How keys and values are stored.
    pub fn format(&self) -> KvFormat {
        self.format
    }

    /// Values per row per layer and per buffer.
    fn row_len(&self) -> usize {
        self.n_head * self.capacity * self.head_dim
    }

    /// Offset of `(row, head, position)` in a layer buffer, `row` being a sequence (its storage
    /// row is `slots[row]`).
    #[inline]
    pub(crate) fn offset(&self, row: usize, head: usize, position: usize) -> usize {
        self.storage_offset(self.slots[row], head, position)
    }

    /// Offset of `(storage row, head, position)` in a layer buffer.
    #[inline]
    fn storage_offset(&self, slot: usize, head: usize, position: usize) -> usize {
        ((slot * self.n_head + head) * self.capacity + position) * self.head_dim
    }

    /// Makes room for `rows` rows of `positions` positions, keeping what is cached.
    pub(crate) fn prepare(&mut self, rows: usize, positions: usize) {
        if positions > self.capacity {
            let new_capacity = positions.max(self.capacity * 2);
            let (old_capacity, used) = (self.capacity, self.seq_len);
            let (n_head, head_dim) = (self.n_head, self.head_dim);
            let blocks = self.rows * n_head;
            let new_len = self.rows.max(rows) * n_head * new_capacity * head_dim;
            for layer in &mut self.layers {
                for buffer in [&mut layer.k, &mut layer.v] {
                    with_buffer!(buffer, values => {
                        let mut grown = KvElement::zeroed(new_len);
                        for block in 0..blocks {
                            let from = block * old_capacity * head_dim;
                            let to = block * new_capacity * head_dim;
                            grown[to..to + used * head_dim]
                                .copy_from_slice(&values[from..from + used * head_dim]);
                        }
                        *values = grown;
                    });
                }
            }
            self.capacity = new_capacity;
        }
        if self.seq_len == 0 {
            // Nothing cached: any storage row will do.
            self.slots = (0..rows).collect();
            self.origins.ids.clear();
        } else if rows < self.rows {
            // Keep the first `rows` sequences, in storage rows `0..rows`.
            let first: Vec<u32> = (0..rows as u32).collect();
            self.permute(&first);
        } else {
            // New sequences take the new storage rows, sharing nothing with the others.
            self.slots.extend(self.rows..rows);
            self.origins.extend(rows, self.seq_len);
        }
        let needed = rows * self.row_len();
        for layer in &mut self.layers {
            if layer.k.len() < needed {
                layer.k.resize(needed);
                layer.v.resize(needed);
            }
        }
        self.rows = rows;
    }

    /// Makes row `i` a copy of what row `rows[i]` held; rows may repeat (forks) or disappear.
    pub fn reorder(&mut self, rows: &[u32]) -> Result<(), ModelError> {
        if self.seq_len == 0 {
            return Ok(());
        }
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= self.rows) {
            return Err(ModelError::Input(format!(
                "cache row {bad} does not exist (batch of {})",
                self.rows
            )));
        }
        let identity =
            rows.len() == self.rows && rows.iter().enumerate().all(|(i, &r)| r as usize == i);
        if !identity {
            self.permute(rows);
        }
        Ok(())
    }

    /// [`Self::reorder`] on checked `rows`: sequence `i` takes the storage row of sequence
    /// `rows[i]` when it is the first to ask for it, which copies nothing; a later one (a fork)
    /// gets a storage row nobody reads any more and a copy of the positions in use where that
    /// row held something else ([`Origins`]). Storage rows stay `0..rows.len()`, so that the
    /// buffers shrink when sequences leave.
    ///
    /// Copying rows into place instead (staged, then written) moved every row whose beam
    /// changed, twice; renaming copies each forked row once, and a permutation without forks
    /// copies nothing. (Copying the buffers from two threads measured no faster: 5-beam
    /// steps of the 124M q8_0 model, 2-vCPU EPYC.)
    fn permute(&mut self, rows: &[u32]) {
        let (old_rows, new_rows) = (self.rows, rows.len());
        let storage_rows = old_rows.max(new_rows);
        let mut taken = vec![false; storage_rows];
        let mut slots: Vec<Option<usize>> = rows
            .iter()
            .map(|&from| {
                let slot = self.slots[from as usize];
                (!std::mem::replace(&mut taken[slot], true)).then_some(slot)
            })
            .collect();
        // Storage rows nobody keeps, lowest first: forks land inside `0..new_rows`.
        let mut free = (0..storage_rows).filter(|&slot| !taken[slot]);
        let mut copies: Vec<(usize, usize)> = Vec::new();
        for (slot, &from) in slots.iter_mut().zip(rows) {
            if slot.is_none() {
                let to = free.next().unwrap_or_default();
                copies.push((self.slots[from as usize], to));
                *slot = Some(to);
            }
        }
        // When sequences leave, a kept row stored past `new_rows` moves into a free row below
        // it, so that the buffers can be truncated.
        let mut low_free = free.take_while(|&slot| slot < new_rows);
        for slot in slots.iter_mut() {
            if let Some(at) = slot.filter(|&at| at >= new_rows) {
                let to = low_free.next().unwrap_or_default();
                copies.push((at, to));
                *slot = Some(to);
            }
        }
        let needed = new_rows * self.row_len();
        let (used, block, n_head, head_dim) = (
            self.seq_len * self.head_dim,
            self.capacity * self.head_dim,
            self.n_head,
            self.head_dim,
        );
        // Sources and destinations are disjoint (kept rows, free rows), so each copy's shared
        // prefix can be read before any of them.
        let copies: Vec<(usize, usize, usize)> = copies
            .into_iter()
            .map(|(from, to)| (from, to, self.origins.shared(from, to) * head_dim))
            .collect();
        let row_len = self.row_len();
        for layer in &mut self.layers {
            for buffer in [&mut layer.k, &mut layer.v] {
                with_buffer!(buffer, values => {
                    if values.len() < storage_rows * row_len {
                        values.resize(storage_rows * row_len, Default::default());
                    }
                    for &(from, to, same) in &copies {
                        for head in 0..n_head {
                            let at = from * row_len + head * block;
                            values.copy_within(
                                at + same..at + used,
                                to * row_len + head * block + same,
                            );
                        }
                    }
                    if new_rows < old_rows {
                        // Sequences left: give their memory back.
                        values.truncate(needed);
                        values.shrink_to_fit();
                    }
                });
            }
        }
        for &(from, to, _) in &copies {
            self.origins.copy(from, to);
        }
        self.origins.ids.truncate(new_rows);
        self.slots = slots.into_iter().map(Option::unwrap_or_default).collect();
        self.rows = new_rows;
    }

    /// A cache whose sequence `i` is this cache's sequence `rows[i]`; rows may repeat.
    pub fn select(&self, rows: &[u32]) -> Result<Self, ModelError> {
        let mut selected = self.clone();
        selected.reorder(rows)?;
        Ok(selected)
    }

    /// Bytes held by the buffers.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.k.bytes() + l.v.bytes())
            .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffers_hold_zeros_of_either_format() {
        assert!(<f32 as KvElement>::zeroed(5)
            .iter()
            .all(|&v| v.to_bits() == 0));
        let halves = <f16 as KvElement>::zeroed(7);
        assert_eq!(halves.len(), 7);
        assert!(halves.iter().all(|&v| v.to_bits() == 0));
    }

    /// A cache of `rows` rows whose every used value encodes (layer, kind, row, head, position,
    /// lane) as a small integer, exact in f16 too.
    fn labelled(rows: usize, seq_len: usize, format: KvFormat) -> KvCache {
        let (n_head, head_dim) = (3, 4);
        let mut cache = KvCache::new(2, n_head, head_dim, seq_len + 2, format);
        cache.prepare(rows, seq_len);
        cache.commit(seq_len);
        let offsets: Vec<(usize, usize, usize, usize)> = (0..rows)
            .flat_map(|row| (0..n_head).map(move |head| (row, head)))
            .flat_map(|(row, head)| (0..seq_len).map(move |p| (row, head, p)))
            .flat_map(|(row, head, p)| (0..head_dim).map(move |lane| (row, head, p, lane)))
            .collect();
        for layer_index in 0..2 {
            for kind in 0..2 {
                for &(row, head, position, lane) in &offsets {
                    let at = cache.offset(row, head, position) + lane;
                    let value = label(layer_index, kind, row, head, position, lane);
                    let layer = &mut cache.layers[layer_index];
                    let buffer = if kind == 0 {
                        &mut layer.k
                    } else {
                        &mut layer.v
                    };
                    buffer.write(at, &[value]);
                }
            }
        }
        cache
    }

    fn label(layer: usize, kind: usize, row: usize, head: usize, pos: usize, lane: usize) -> f32 {
        (((((layer * 2 + kind) * 6 + row) * 3 + head) * 5 + pos) * 4 + lane) as f32
    }

    /// Checks that row `i` holds what row `origin[i]` was labelled with.
    fn assert_rows(cache: &KvCache, origin: &[usize]) {
        assert_eq!(cache.rows, origin.len());
        for (layer_index, layer) in cache.layers.iter().enumerate() {
            for (kind, buffer) in [&layer.k, &layer.v].into_iter().enumerate() {
                for (row, &from) in origin.iter().enumerate() {
                    for head in 0..cache.n_head {
                        for position in 0..cache.seq_len {
                            let mut got = Vec::new();
                            buffer.read_into(
                                cache.offset(row, head, position),
                                cache.head_dim,
                                &mut got,
                            );
                            let want: Vec<f32> = (0..cache.head_dim)
                                .map(|lane| label(layer_index, kind, from, head, position, lane))
                                .collect();
                            assert_eq!(got, want, "row {row} should come from {from}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn each_rows_head_buffers_are_where_offset_puts_that_row_and_head() {
        let mut cache = labelled(4, 3, KvFormat::F32);
        // Storage rows no longer in order: row `i` lives in another slot.
        cache.reorder(&[2, 0, 3, 1]).unwrap();
        let (n_head, d, capacity) = (cache.n_head, cache.head_dim, cache.capacity);
        assert!(
            cache.heads_mut::<f16>(1).is_none(),
            "an f32 cache holds no f16"
        );
        let heads = cache.heads_mut::<f32>(1).unwrap();
        assert_eq!(heads.len(), 4 * n_head);
        for (task, (keys, values)) in heads.into_iter().enumerate() {
            assert_eq!((keys.len(), values.len()), (capacity * d, capacity * d));
            keys[2 * d] = (1000 + task) as f32;
            values[2 * d + 1] = (2000 + task) as f32;
        }
        let (KvBuffer::F32(keys), KvBuffer::F32(values)) = cache.buffers(1) else {
            panic!("an f32 cache");
        };
        for row in 0..4 {
            for head in 0..n_head {
                let at = cache.offset(row, head, 2);
                let task = (row * n_head + head) as f32;
                assert_eq!((keys[at], values[at + 1]), (1000.0 + task, 2000.0 + task));
            }
        }
    }

    #[test]
    fn reorder_forks_permutes_and_drops_rows() {
        for format in [KvFormat::F32, KvFormat::F16] {
            let mut cache = labelled(1, 3, format);
            cache.reorder(&[0, 0, 0, 0, 0]).unwrap();
            assert_rows(&cache, &[0; 5]);

            let mut cache = labelled(5, 3, format);
            cache.reorder(&[1, 0, 0, 4, 2]).unwrap();
            assert_rows(&cache, &[1, 0, 0, 4, 2]);
            // Then as beams do, step after step, with the composition tracked.
            cache.reorder(&[4, 4, 1, 3, 0]).unwrap();
            assert_rows(&cache, &[2, 2, 0, 4, 1]);
            cache.reorder(&[0, 1, 2, 3, 4]).unwrap();
            assert_rows(&cache, &[2, 2, 0, 4, 1]);

            let mut cache = labelled(5, 2, format);
            cache.reorder(&[3, 1]).unwrap();
            assert_rows(&cache, &[3, 1]);
            assert_eq!(cache.layers[0].k.len(), 2 * cache.row_len());
            assert!(cache.reorder(&[2]).is_err(), "row 2 no longer exists");

            // Renamed rows survive forks that shrink the batch, growth of the buffers, and a
            // fork into more rows.
            let mut cache = labelled(5, 3, format);
            cache.reorder(&[4, 4, 1, 3, 0]).unwrap();
            assert_rows(&cache, &[4, 4, 1, 3, 0]);
            cache.reorder(&[3, 3, 0]).unwrap();
            assert_rows(&cache, &[3, 3, 4]);
            assert_eq!(cache.layers[1].v.len(), 3 * cache.row_len());
            let capacity = cache.capacity;
            cache.prepare(3, capacity + 1);
            assert!(cache.capacity > capacity);
            assert_rows(&cache, &[3, 3, 4]);
            cache.reorder(&[2, 1, 2, 0, 2, 2]).unwrap();
            assert_rows(&cache, &[4, 3, 4, 3, 4, 4]);
        }
    }

    #[test]
    fn forks_copy_only_where_rows_differ_and_end_up_whole() {
        for format in [KvFormat::F32, KvFormat::F16] {
            // Three positions of one row, forked into three rows that then each write a fourth
            // position of their own (labelled as rows 3, 4 and 5).
            let mut cache = labelled(1, 3, format);
            cache.reorder(&[0, 0, 0]).unwrap();
            cache.prepare(3, 4);
            for layer in 0..2 {
                let (n_head, d) = (cache.n_head, cache.head_dim);
                let mut rows = [Vec::new(), Vec::new()];
                for row in 0..3 {
                    for (kind, values) in rows.iter_mut().enumerate() {
                        *values = (0..n_head * d)
                            .map(|i| label(layer, kind, 3 + row, i / d, 3, i % d))
                            .collect();
                    }
                    cache.store(layer, row, 3, &rows[0], &rows[1]);
                }
            }
            cache.commit(4);
            let slot = |cache: &KvCache, row: usize| cache.slots[row];
            assert_eq!(cache.origins.shared(slot(&cache, 1), slot(&cache, 2)), 3);

            // Row 1 takes row 2's history: only its fourth position needs copying.
            cache.reorder(&[2, 2, 0]).unwrap();
            assert_eq!(cache.origins.shared(slot(&cache, 0), slot(&cache, 1)), 4);
            assert_eq!(cache.origins.shared(slot(&cache, 0), slot(&cache, 2)), 3);
            for (row, fourth) in [(0, 5), (1, 5), (2, 3)] {
                for (layer_index, layer) in cache.layers.iter().enumerate() {
                    for (kind, buffer) in [&layer.k, &layer.v].into_iter().enumerate() {
                        for head in 0..cache.n_head {
                            for position in 0..4 {
                                let mut got = Vec::new();
                                let at = cache.offset(row, head, position);
                                buffer.read_into(at, cache.head_dim, &mut got);
                                let from = if position < 3 { 0 } else { fourth };
                                let want: Vec<f32> = (0..cache.head_dim)
                                    .map(|lane| {
                                        label(layer_index, kind, from, head, position, lane)
                                    })
                                    .collect();
                                assert_eq!(got, want, "row {row}, position {position}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn f16_caches_take_half_the_bytes_and_round_to_nearest() {
        let f32_cache = labelled(2, 3, KvFormat::F32);
        let f16_cache = labelled(2, 3, KvFormat::F16);
        assert_eq!(f16_cache.allocated_bytes() * 2, f32_cache.allocated_bytes());
        let mut buffer = KvBuffer::empty(KvFormat::F16);
        buffer.resize(2);
        buffer.write(0, &[0.1, 65504.0]);
        let mut back = Vec::new();
        buffer.read_into(0, 2, &mut back);
        assert_eq!(back, vec![0.099975586, 65504.0]);
    }
}
