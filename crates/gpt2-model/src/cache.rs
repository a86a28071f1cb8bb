use crate::ModelError;

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
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) seq_len: usize,
    pub(crate) rows: usize,
    pub(crate) capacity: usize,
    pub(crate) n_head: usize,
    pub(crate) head_dim: usize,
    /// Reused staging area of [`KvCache::reorder`].
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
        let row_len = self.row_len();
        let used = self.seq_len * self.head_dim;
        let block = self.capacity * self.head_dim;
        let n_head = self.n_head;
        let needed = rows.len() * row_len;
        let mut staging = std::mem::take(&mut self.spare);
        staging.resize(sources.len() * n_head * used, 0.0);
        for layer in &mut self.layers {
            for buffer in [&mut layer.k, &mut layer.v] {
                if buffer.len() < needed {
                    buffer.resize(needed, 0.0);
                }
                for (slot, &from) in sources.iter().enumerate() {
                    for head in 0..n_head {
                        let at = from * row_len + head * block;
                        staging[(slot * n_head + head) * used..][..used]
                            .copy_from_slice(&buffer[at..at + used]);
                    }
                }
                for &(to, from) in &moves {
                    let slot = sources.binary_search(&from).unwrap_or_default();
                    for head in 0..n_head {
                        let at = to * row_len + head * block;
                        buffer[at..at + used]
                            .copy_from_slice(&staging[(slot * n_head + head) * used..][..used]);
                    }
                }
                if rows.len() < self.rows {
                    // Sequences left: give their memory back.
                    buffer.truncate(needed);
                    buffer.shrink_to_fit();
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
            .map(|l| (l.k.capacity() + l.v.capacity()) * std::mem::size_of::<f32>())
            .sum::<usize>()
            + self.spare.capacity() * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of `rows` rows whose every used value encodes (row, head, position, lane).
    fn labelled(rows: usize, seq_len: usize) -> KvCache {
        let (n_head, head_dim) = (3, 4);
        let mut cache = KvCache::new(2, n_head, head_dim, seq_len + 2);
        cache.prepare(rows, seq_len);
        cache.seq_len = seq_len;
        for (layer_index, layer) in cache.layers.iter_mut().enumerate() {
            for (kind, buffer) in [&mut layer.k, &mut layer.v].into_iter().enumerate() {
                for row in 0..rows {
                    for head in 0..n_head {
                        for position in 0..seq_len {
                            for lane in 0..head_dim {
                                let at = ((row * n_head + head) * (seq_len + 2) + position)
                                    * head_dim
                                    + lane;
                                buffer[at] = label(layer_index, kind, row, head, position, lane);
                            }
                        }
                    }
                }
            }
        }
        cache
    }

    fn label(layer: usize, kind: usize, row: usize, head: usize, pos: usize, lane: usize) -> f32 {
        (((((layer * 2 + kind) * 10 + row) * 10 + head) * 10 + pos) * 10 + lane) as f32
    }

    /// Checks that row `i` holds what row `origin[i]` was labelled with.
    fn assert_rows(cache: &KvCache, origin: &[usize]) {
        assert_eq!(cache.rows, origin.len());
        for (layer_index, layer) in cache.layers.iter().enumerate() {
            for (kind, buffer) in [&layer.k, &layer.v].into_iter().enumerate() {
                for (row, &from) in origin.iter().enumerate() {
                    for head in 0..cache.n_head {
                        for position in 0..cache.seq_len {
                            for lane in 0..cache.head_dim {
                                let at = cache.offset(row, head, position) + lane;
                                assert_eq!(
                                    buffer[at],
                                    label(layer_index, kind, from, head, position, lane),
                                    "row {row} should come from {from}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn reorder_forks_permutes_and_drops_rows() {
        let mut cache = labelled(1, 3);
        cache.reorder(&[0, 0, 0, 0, 0]).unwrap();
        assert_rows(&cache, &[0; 5]);

        let mut cache = labelled(5, 3);
        cache.reorder(&[1, 0, 0, 4, 2]).unwrap();
        assert_rows(&cache, &[1, 0, 0, 4, 2]);
        // Then as beams do, step after step, with the composition tracked.
        cache.reorder(&[4, 4, 1, 3, 0]).unwrap();
        assert_rows(&cache, &[2, 2, 0, 4, 1]);
        cache.reorder(&[0, 1, 2, 3, 4]).unwrap();
        assert_rows(&cache, &[2, 2, 0, 4, 1]);

        let mut cache = labelled(5, 2);
        cache.reorder(&[3, 1]).unwrap();
        assert_rows(&cache, &[3, 1]);
        assert_eq!(cache.layers[0].k.len(), 2 * cache.row_len());
        assert!(cache.reorder(&[2]).is_err(), "row 2 no longer exists");
    }
}
