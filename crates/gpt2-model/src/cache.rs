use crate::ModelError;

/// Keys and values of every layer for a batch of sequences that share one length.
///
/// Each layer holds two flat buffers laid out `[row][head][position][head_dim]`, with room for
/// `capacity` positions per row, so a decode step writes its keys and values in place and the
/// attention kernel reads each head's keys contiguously. Buffers are sized once (give the final
/// length to [`crate::Gpt2Model::new_cache_with_capacity`]) and grow by doubling otherwise.
/// [`KvCache::reorder`] forks or permutes rows (one prompt into several return sequences, beams
/// after a step) by copying only the positions in use; beams keep the second buffer between steps.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) seq_len: usize,
    pub(crate) rows: usize,
    pub(crate) capacity: usize,
    pub(crate) n_head: usize,
    pub(crate) head_dim: usize,
    /// Reused destination of [`KvCache::reorder`].
    spare: Vec<f32>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct LayerCache {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

impl KvCache {
    pub(crate) fn new(n_layer: usize, n_head: usize, head_dim: usize, capacity: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); n_layer],
            seq_len: 0,
            rows: 0,
            capacity,
            n_head,
            head_dim,
            spare: Vec::new(),
        }
    }

    /// Number of positions cached per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of sequences cached, `None` while empty.
    pub fn batch_size(&self) -> Option<usize> {
        (self.seq_len > 0).then_some(self.rows)
    }

    /// Positions each row has room for before the buffers grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Floats per row per layer and per buffer.
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
            for layer in &mut self.layers {
                for buffer in [&mut layer.k, &mut layer.v] {
                    let mut grown =
                        vec![0.0f32; self.rows.max(rows) * n_head * new_capacity * head_dim];
                    for block in 0..self.rows * n_head {
                        let from = block * old_capacity * head_dim;
                        let to = block * new_capacity * head_dim;
                        grown[to..to + used * head_dim]
                            .copy_from_slice(&buffer[from..from + used * head_dim]);
                    }
                    *buffer = grown;
                }
            }
            self.capacity = new_capacity;
        }
        let needed = rows * self.row_len();
        for layer in &mut self.layers {
            if layer.k.len() < needed {
                layer.k.resize(needed, 0.0);
                layer.v.resize(needed, 0.0);
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
        let row_len = self.row_len();
        let used = self.seq_len * self.head_dim;
        let block = self.capacity * self.head_dim;
        let n_head = self.n_head;
        let mut spare = std::mem::take(&mut self.spare);
        for layer in &mut self.layers {
            for buffer in [&mut layer.k, &mut layer.v] {
                spare.clear();
                spare.resize(rows.len().max(1) * row_len, 0.0);
                for (to_row, &from_row) in rows.iter().enumerate() {
                    for head in 0..n_head {
                        let from = from_row as usize * row_len + head * block;
                        let to = to_row * row_len + head * block;
                        spare[to..to + used].copy_from_slice(&buffer[from..from + used]);
                    }
                }
                std::mem::swap(buffer, &mut spare);
            }
        }
        // Keep the spare buffer only for permutations (beams reorder at every step); after a fork
        // or when sequences leave, the old buffer is just freed.
        if rows.len() == self.rows {
            self.spare = spare;
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
            .map(|l| (l.k.capacity() + l.v.capacity()) * std::mem::size_of::<f32>())
            .sum::<usize>()
            + self.spare.capacity() * std::mem::size_of::<f32>()
    }
}
