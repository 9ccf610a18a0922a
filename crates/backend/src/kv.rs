//! The paged KV-cache layout shared by the VMU, the model and every kernel.
//!
//! A block id names `block_tokens` tokens of K and V for every layer. Blocks are contiguous and
//! equally sized, so swapping a block is one contiguous copy. Inside a block the order is
//! `[layer][k|v][kv_head][token][head_dim]`: one head's tokens are contiguous, so a decode kernel
//! reads `block_tokens * head_dim` consecutive elements per (block, layer, head).

use crate::DType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per block (default 16).
    pub block_tokens: usize,
    pub dtype: DType,
}

impl KvLayout {
    /// Elements of one K (or V) slab: one layer, one head, `block_tokens` tokens.
    pub const fn head_slab_elems(&self) -> usize {
        self.block_tokens * self.head_dim
    }

    /// Bytes of one whole block (all layers, K and V).
    pub const fn block_bytes(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.block_tokens * self.head_dim * self.dtype.size_bytes()
    }

    /// Element offset inside a block of (layer, k=0|v=1, head, token, dim 0).
    pub const fn elem_in_block(&self, layer: usize, kv: usize, head: usize, token: usize) -> usize {
        (((layer * 2 + kv) * self.kv_heads + head) * self.block_tokens + token) * self.head_dim
    }

    /// Element offset of (block, layer, k|v, head, token, dim 0) from the start of the cache.
    pub const fn elem_offset(&self, block: usize, layer: usize, kv: usize, head: usize, token: usize) -> usize {
        block * (self.block_bytes() / self.dtype.size_bytes()) + self.elem_in_block(layer, kv, head, token)
    }
}
