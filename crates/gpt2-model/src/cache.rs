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
/// [`KvCache::reorder`] forks or permutes rows (one prompt into several return sequences, beams
/// after a step) in place, copying only the rows that change and only the positions in use.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    seq_len: usize,
    rows: usize,
    capacity: usize,
    n_head: usize,
    head_dim: usize,
    format: KvFormat,
    /// Reused staging area of [`KvCache::reorder`].
    spare: KvBuffer,
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

/// A cached value type: f32 or f16, read back as f32.
pub(crate) trait KvElement: Copy + Default + Send + Sync {
    /// The format whose buffers hold this type: SIMD kernels pick their loads by it, so a new
    /// 16-bit format (bf16) cannot be mistaken for f16 by its size.
    const FORMAT: KvFormat;

    fn to_f32(self) -> f32;
}

impl KvElement for f32 {
    const FORMAT: KvFormat = KvFormat::F32;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElement for f16 {
    const FORMAT: KvFormat = KvFormat::F16;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
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

    fn resize(&mut self, len: usize) {
        with_buffer!(self, values => values.resize(len, Default::default()))
    }

    /// Stores `source` (f32) at `at`, rounding to the buffer's format (F16C instructions where
    /// the CPU has them).
    fn write(&mut self, at: usize, source: &[f32]) {
        let range = at..at + source.len();
        match self {
            Self::F32(values) => values[range].copy_from_slice(source),
            Self::F16(values) => values[range].convert_from_f32_slice(source),
        }
    }

    /// Appends `len` values from `at`, as f32, to `out`.
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
            capacity,
            n_head,
            head_dim,
            format,
            spare: KvBuffer::empty(format),
        }
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

    /// The keys and values buffers of `layer`, laid out as [`Self::offset`] says.
    pub(crate) fn buffers(&self, layer: usize) -> (&KvBuffer, &KvBuffer) {
        let entry = &self.layers[layer];
        (&entry.k, &entry.v)
    }

    /// The first `positions` keys and values of `layer` for every row, as f32
    /// `(rows, n_head, positions, head_dim)`: what a prefill continuing a cache attends to.
    pub(crate) fn gather(&self, layer: usize, positions: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.head_dim;
        let gather = |buffer: &KvBuffer| {
            let mut data = Vec::with_capacity(self.rows * self.n_head * positions * d);
            for row in 0..self.rows {
                for head in 0..self.n_head {
                    buffer.read_into(self.offset(row, head, 0), positions * d, &mut data);
                }
            }
            data
        };
        let entry = &self.layers[layer];
        (gather(&entry.k), gather(&entry.v))
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

    /// Offset of `(row, head, position)` in a layer buffer.
    #[inline]
    pub(crate) fn offset(&self, row: usize, head: usize, position: usize) -> usize {
        ((row * self.n_head + head) * self.capacity + position) * self.head_dim
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
                        let mut grown = vec![Default::default(); new_len];
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
        if identity {
            return Ok(());
        }
        // Rows that keep their own contents are left in place; the sources of the others are
        // staged (only the positions in use), then written to their destinations. A beam step
        // moves a few rows, so this copies far less than rebuilding every row.
        let moves: Vec<(usize, usize)> = rows
            .iter()
            .enumerate()
            .filter(|&(to, &from)| to != from as usize)
            .map(|(to, &from)| (to, from as usize))
            .collect();
        let mut sources: Vec<usize> = moves.iter().map(|&(_, from)| from).collect();
        sources.sort_unstable();
        sources.dedup();
        let plan = Reorder {
            moves: &moves,
            sources: &sources,
            row_len: self.row_len(),
            used: self.seq_len * self.head_dim,
            block: self.capacity * self.head_dim,
            n_head: self.n_head,
            rows_after: rows.len(),
            shrinks: rows.len() < self.rows,
        };
        let mut staging = std::mem::replace(&mut self.spare, KvBuffer::empty(self.format));
        for layer in &mut self.layers {
            for buffer in [&mut layer.k, &mut layer.v] {
                match (buffer, &mut staging) {
                    (KvBuffer::F32(values), KvBuffer::F32(staging)) => plan.apply(values, staging),
                    (KvBuffer::F16(values), KvBuffer::F16(staging)) => plan.apply(values, staging),
                    _ => unreachable!("a cache's buffers share its format"),
                }
            }
        }
        // Keep the staging buffer only for permutations (beams reorder at every step); after a
        // fork or when sequences leave, it is freed.
        if rows.len() == self.rows {
            self.spare = staging;
        }
        self.rows = rows.len();
        Ok(())
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
            + self.spare.bytes()
    }
}

/// What [`KvCache::reorder`] does to each buffer.
struct Reorder<'a> {
    /// `(to, from)` rows, for the rows that change.
    moves: &'a [(usize, usize)],
    /// The distinct `from` rows, sorted.
    sources: &'a [usize],
    row_len: usize,
    used: usize,
    block: usize,
    n_head: usize,
    rows_after: usize,
    shrinks: bool,
}

impl Reorder<'_> {
    fn apply<T: Copy + Default>(&self, buffer: &mut Vec<T>, staging: &mut Vec<T>) {
        let (used, n_head) = (self.used, self.n_head);
        let needed = self.rows_after * self.row_len;
        staging.resize(self.sources.len() * n_head * used, T::default());
        if buffer.len() < needed {
            buffer.resize(needed, T::default());
        }
        for (slot, &from) in self.sources.iter().enumerate() {
            for head in 0..n_head {
                let at = from * self.row_len + head * self.block;
                staging[(slot * n_head + head) * used..][..used]
                    .copy_from_slice(&buffer[at..at + used]);
            }
        }
        for &(to, from) in self.moves {
            let slot = self.sources.partition_point(|&s| s < from);
            for head in 0..n_head {
                let at = to * self.row_len + head * self.block;
                buffer[at..at + used]
                    .copy_from_slice(&staging[(slot * n_head + head) * used..][..used]);
            }
        }
        if self.shrinks {
            // Sequences left: give their memory back.
            buffer.truncate(needed);
            buffer.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of `rows` rows whose every used value encodes (layer, kind, row, head, position,
    /// lane) as a small integer, exact in f16 too.
    fn labelled(rows: usize, seq_len: usize, format: KvFormat) -> KvCache {
        let (n_head, head_dim) = (3, 4);
        let mut cache = KvCache::new(2, n_head, head_dim, seq_len + 2, format);
        cache.prepare(rows, seq_len);
        cache.seq_len = seq_len;
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
