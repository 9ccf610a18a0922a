//! Exec: an op or a small acyclic graph of ops on a tenant's tensors, run through [`Backend`].
//!
//! Two passes. First, shapes and dtypes of every node are inferred on the host from the request
//! and the input descriptors alone — every mismatch is a typed error before any memory is taken.
//! Then quota for every node's output and its temporaries (intermediates included, so a graph
//! cannot allocate past the tenant's bound) is reserved, regions are reserved, the ops are issued
//! on the default stream of an Exec lane — a backend handle this request holds alone, never the
//! engine's ([`crate::lanes`]) — and that stream is synchronised. Requested outputs become new handles;
//! intermediates and temporaries are freed and their quota returned when the request ends.
//!
//! Every op is composed from [`Backend`] trait calls only, so it runs wherever a backend does.
//! Layout ops (slice, concat, dimension swaps, gather along an inner dimension) are device copies
//! of contiguous runs; their number is known from the shapes in pass 1 and bounded by
//! [`NODE_COPIES_MAX`]. Small constants an op needs (a causal mask, a scale factor, RoPE
//! frequencies, a ones vector) are written into temporary regions that live until the stream has
//! been synchronised, because a device backend reads them asynchronously.

use djinn_backend::Backend;
use djinn_proto::msg::{ExecInput, ExecOp, ExecReq};
use djinn_proto::{Status, TensorDesc};

mod infer;
mod run;

use crate::auth::TenantId;
use crate::tensors::{backend_status, Store, Tensor, TensorError};

/// Why an Exec failed: a status for the reply and a message that names the node.
#[derive(Debug)]
pub struct ExecError {
    pub status: Status,
    pub message: String,
}

impl ExecError {
    fn at(node: usize, op: ExecOp, status: Status, why: impl std::fmt::Display) -> Self {
        ExecError { status, message: format!("exec node {node} ({}): {why}", op.name()) }
    }
}

impl From<TensorError> for ExecError {
    fn from(e: TensorError) -> Self {
        ExecError { status: e.status(), message: e.to_string() }
    }
}

/// Most device copies one layout node may issue. Each is a driver call on a GPU, so an op that
/// would move data in more (smaller) runs than this is refused rather than left to crawl.
pub const NODE_COPIES_MAX: u64 = 1 << 20;

/// A refusal or failure of one node: the status and why.
type NodeResult<T> = Result<T, (Status, String)>;

/// Runs `req` for `tenant`; returns the new handles and descriptors of the requested outputs.
pub fn exec<B: Backend>(
    store: &Store<B>,
    tenant: &TenantId,
    req: &ExecReq,
    nodes_max: usize,
) -> Result<Vec<(u64, TensorDesc)>, ExecError> {
    if req.nodes.is_empty() || req.outputs.is_empty() {
        return Err(ExecError {
            status: Status::BadArgument,
            message: "exec needs at least one node and output".into(),
        });
    }
    if req.nodes.len() > nodes_max {
        return Err(ExecError {
            status: Status::LimitExceeded,
            message: format!("exec graph of {} nodes exceeds the limit of {nodes_max}", req.nodes.len()),
        });
    }
    let mut seen = vec![false; req.nodes.len()];
    for &o in &req.outputs {
        let slot = seen.get_mut(o as usize).ok_or_else(|| ExecError {
            status: Status::BadArgument,
            message: format!("output names node {o} of {}", req.nodes.len()),
        })?;
        if std::mem::replace(slot, true) {
            return Err(ExecError {
                status: Status::BadArgument,
                message: format!("node {o} is listed twice as output"),
            });
        }
    }

    store.with_table(tenant, |table| {
        // Pass 1: shapes.
        let mut descs: Vec<TensorDesc> = Vec::with_capacity(req.nodes.len());
        let mut temp_bytes = 0u64;
        for (i, node) in req.nodes.iter().enumerate() {
            let mut ins = Vec::with_capacity(node.inputs.len());
            for input in &node.inputs {
                ins.push(match *input {
                    ExecInput::Handle(h) => table.get(h)?.desc,
                    // The decoder already checks that Node(j) names an earlier node; check again
                    // so a locally built request cannot index past the graph.
                    ExecInput::Node(j) => *descs.get(j as usize).ok_or_else(|| {
                        ExecError::at(i, node.op, Status::BadArgument, format!("input names node {j}"))
                    })?,
                });
            }
            let p = infer::infer(node, &ins).map_err(|(st, why)| ExecError::at(i, node.op, st, why))?;
            // A node with an empty output issues no work and writes no temporaries.
            if p.desc.elements() > 0 {
                temp_bytes = temp_bytes.saturating_add(p.temp_bytes);
            }
            descs.push(p.desc);
        }

        // Pass 2: quota for every node and temporary, regions, ops.
        let total_bytes = descs.iter().fold(temp_bytes, |acc, d| acc.saturating_add(d.byte_len()));
        let mut res = store.reserve(tenant, req.outputs.len(), total_bytes)?;
        let mut outs: Vec<Tensor<B>> = Vec::with_capacity(descs.len());
        for d in &descs {
            outs.push(store.new_tensor(d)?);
        }
        let lane = store.exec_lane().map_err(|e| ExecError { status: Status::Busy, message: e.to_string() })?;
        let backend = &*lane;
        // Dropped only after the stream is synchronised: the device may still read them.
        let mut temps: Vec<B::Region> = Vec::new();
        for (i, node) in req.nodes.iter().enumerate() {
            let (done, rest) = outs.split_at(i);
            let mut ins: Vec<&Tensor<B>> = Vec::with_capacity(node.inputs.len());
            for input in &node.inputs {
                ins.push(match *input {
                    ExecInput::Handle(h) => table.get(h)?,
                    ExecInput::Node(j) => &done[j as usize],
                });
            }
            if let Err((st, why)) = run::run_node(backend, node, &ins, &rest[0], &mut temps) {
                // Work already issued may still read the temporaries and outputs.
                let _ = backend.sync_stream(backend.default_stream());
                return Err(ExecError::at(i, node.op, st, why));
            }
        }
        backend
            .sync_stream(backend.default_stream())
            .map_err(|e| ExecError { status: backend_status(&e), message: format!("exec: {e}") })?;
        drop(temps);

        // Keep the requested outputs; intermediates drop here and their quota goes back.
        let mut slots: Vec<Option<Tensor<B>>> = outs.into_iter().map(Some).collect();
        let kept: Vec<Tensor<B>> = req.outputs.iter().filter_map(|&o| slots[o as usize].take()).collect();
        let kept_bytes = kept.iter().map(|t| t.desc.byte_len()).sum();
        drop(slots);
        res.shrink_bytes(kept_bytes);
        let out_descs: Vec<TensorDesc> = kept.iter().map(|t| t.desc).collect();
        let handles = store.insert_locked(res, table, kept);
        Ok(handles.into_iter().zip(out_descs).collect())
    })
}
