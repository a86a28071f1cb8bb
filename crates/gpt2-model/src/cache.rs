use candle_core::Tensor;

use crate::ModelError;

/// Keys and values of every layer for a batch of sequences that share one length.
///
/// Layer tensors are `(batch, n_head, seq_len, head_dim)`. [`KvCache::select`] forks or reorders
/// the batch (one prompt into several return sequences, beams after a step) without rerunning
/// the model.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(crate) seq_len: usize,
}

impl KvCache {
    pub(crate) fn new(n_layer: usize) -> Self {
        Self {
            layers: vec![None; n_layer],
            seq_len: 0,
        }
    }

    /// Number of positions cached per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of sequences cached, `None` while empty.
    pub fn batch_size(&self) -> Option<usize> {
        self.layers
            .first()
            .and_then(|layer| layer.as_ref())
            .and_then(|(k, _)| k.dim(0).ok())
    }

    /// A cache whose sequence `i` is this cache's sequence `rows[i]`; rows may repeat.
    pub fn select(&self, rows: &[u32]) -> Result<Self, ModelError> {
        let Some(batch) = self.batch_size() else {
            return Ok(self.clone());
        };
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= batch) {
            return Err(ModelError::Input(format!(
                "cache row {bad} does not exist (batch of {batch})"
            )));
        }
        let first = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let index = Tensor::new(rows, &first).map_err(ModelError::from_candle)?;
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                layer
                    .as_ref()
                    .map(|(k, v)| Ok((k.index_select(&index, 0)?, v.index_select(&index, 0)?)))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(ModelError::from_candle)?;
        Ok(Self {
            layers,
            seq_len: self.seq_len,
        })
    }
}
