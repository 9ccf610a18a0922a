//! Exec: an op or a small acyclic graph of ops on a tenant's tensors, run through [`Backend`].
//!
//! Two passes. First, shapes and dtypes of every node are inferred on the host from the request
//! and the input descriptors alone — every mismatch is a typed error before any memory is taken.
//! Then quota for every node's output (intermediates included, so a graph cannot allocate past the
//! tenant's bound) is reserved, regions are reserved, the ops are issued on the default stream
//! and the stream is synchronised. Requested outputs become new handles; intermediates are freed
//! and their quota returned when the request ends.

use djinn_backend::{Backend, BinaryOp, GemmArgs, UnaryOp, View};
use djinn_proto::msg::{ExecInput, ExecNode, ExecOp, ExecReq};
use djinn_proto::{DType, Status, TensorDesc};

use crate::auth::TenantId;
use crate::tensors::{backend_dtype, backend_status, Store, Tensor, TensorError};

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

/// Default RMSNorm epsilon when the node carries no f32 attribute.
const RMS_EPS_DEFAULT: f32 = 1e-5;

fn desc(dtype: DType, shape: &[u64]) -> Result<TensorDesc, String> {
    TensorDesc::new(dtype, shape).map_err(|e| e.to_string())
}

fn last_dim(d: &TensorDesc) -> Result<u64, String> {
    d.shape().last().copied().ok_or_else(|| "needs at least one dimension".to_string())
}

fn same_dtype(a: &TensorDesc, b: &TensorDesc) -> Result<(), (Status, String)> {
    if a.dtype() != b.dtype() {
        return Err((Status::DTypeMismatch, format!("dtypes differ: {} vs {}", a.dtype().name(), b.dtype().name())));
    }
    Ok(())
}

fn float_only(d: &TensorDesc) -> Result<(), (Status, String)> {
    match d.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err((Status::DTypeMismatch, format!("needs a float tensor, got {}", other.name()))),
    }
}

fn shape_err(s: String) -> (Status, String) {
    (Status::ShapeMismatch, s)
}

/// The output descriptor of one node from its input descriptors, or why it cannot run.
fn infer(node: &ExecNode, ins: &[TensorDesc]) -> Result<TensorDesc, (Status, String)> {
    let arity = match node.op {
        ExecOp::MatMul | ExecOp::Add | ExecOp::Sub | ExecOp::Mul | ExecOp::Div | ExecOp::SiluMul => 2,
        ExecOp::RmsNorm | ExecOp::Embedding | ExecOp::Rope => 2,
        _ => 1,
    };
    if ins.len() != arity {
        return Err((Status::BadArgument, format!("takes {arity} inputs, got {}", ins.len())));
    }
    let a = &ins[0];
    match node.op {
        ExecOp::Add | ExecOp::Sub | ExecOp::Mul | ExecOp::Div | ExecOp::SiluMul => {
            same_dtype(a, &ins[1])?;
            float_only(a)?;
            if a.shape() != ins[1].shape() {
                return Err(shape_err(format!("shapes differ: {:?} vs {:?}", a.shape(), ins[1].shape())));
            }
            Ok(*a)
        }
        ExecOp::Silu | ExecOp::Exp | ExecOp::Neg | ExecOp::Sqrt => {
            float_only(a)?;
            Ok(*a)
        }
        ExecOp::Softmax => {
            float_only(a)?;
            last_dim(a).map_err(shape_err)?;
            Ok(*a)
        }
        ExecOp::RmsNorm => {
            let w = &ins[1];
            same_dtype(a, w)?;
            float_only(a)?;
            let hidden = last_dim(a).map_err(shape_err)?;
            if w.shape() != [hidden] {
                return Err(shape_err(format!("weight {:?} must be [{hidden}]", w.shape())));
            }
            Ok(*a)
        }
        ExecOp::MatMul => {
            let b = &ins[1];
            same_dtype(a, b)?;
            float_only(a)?;
            let (sa, sb) = (a.shape(), b.shape());
            if sa.len() < 2 || sb.len() < 2 {
                return Err(shape_err(format!("needs rank ≥ 2 operands, got {sa:?} × {sb:?}")));
            }
            let (m, k) = (sa[sa.len() - 2], sa[sa.len() - 1]);
            let (k2, n) = (sb[sb.len() - 2], sb[sb.len() - 1]);
            if k != k2 {
                return Err(shape_err(format!("inner dimensions differ: {sa:?} × {sb:?}")));
            }
            let (ba, bb) = (&sa[..sa.len() - 2], &sb[..sb.len() - 2]);
            let b_batch: u64 = bb.iter().product();
            // b's batch dims must equal a's, or b is one matrix shared by every batch entry.
            if ba != bb && b_batch != 1 {
                return Err(shape_err(format!("batch dimensions differ: {sa:?} × {sb:?}")));
            }
            let mut shape = ba.to_vec();
            shape.extend([m, n]);
            desc(a.dtype(), &shape).map_err(shape_err)
        }
        ExecOp::Reshape => {
            let mut shape = Vec::with_capacity(node.attrs_i64.len());
            let mut infer_at = None;
            for (i, &d) in node.attrs_i64.iter().enumerate() {
                match d {
                    -1 if infer_at.is_none() => {
                        infer_at = Some(i);
                        shape.push(1);
                    }
                    d if d >= 0 => shape.push(d as u64),
                    d => return Err((Status::BadArgument, format!("bad dimension {d} in new shape"))),
                }
            }
            let known: u64 = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| shape_err("new shape overflows".to_string()))?;
            if let Some(i) = infer_at {
                if known == 0 || a.elements() % known != 0 {
                    return Err(shape_err(format!(
                        "cannot infer -1 reshaping {:?} to {:?}",
                        a.shape(),
                        node.attrs_i64
                    )));
                }
                shape[i] = a.elements() / known;
            }
            let out = desc(a.dtype(), &shape).map_err(shape_err)?;
            if out.elements() != a.elements() {
                return Err(shape_err(format!("reshape {:?} to {:?} changes the element count", a.shape(), shape)));
            }
            Ok(out)
        }
        ExecOp::Copy => Ok(*a),
        ExecOp::Cast => {
            let code = node.attrs_i64.first().copied().ok_or((Status::BadArgument, "needs the target dtype".into()))?;
            let to = u8::try_from(code)
                .ok()
                .and_then(|c| DType::try_from(c).ok())
                .ok_or((Status::BadArgument, format!("unknown dtype code {code}")))?;
            desc(to, a.shape()).map_err(shape_err)
        }
        ExecOp::Embedding => {
            let ids = &ins[1];
            if ids.dtype() != DType::I32 {
                return Err((Status::DTypeMismatch, format!("ids must be i32, got {}", ids.dtype().name())));
            }
            if a.rank() != 2 {
                return Err(shape_err(format!("table must be [vocab, hidden], got {:?}", a.shape())));
            }
            let mut shape = ids.shape().to_vec();
            shape.push(a.shape()[1]);
            desc(a.dtype(), &shape).map_err(shape_err)
        }
        ExecOp::Gelu | ExecOp::Scale | ExecOp::Transpose | ExecOp::Sum | ExecOp::Rope => {
            Err((Status::Unsupported, "not implemented by this server's backends yet".into()))
        }
    }
}

fn as_usize(v: u64) -> usize {
    // Shapes here describe tensors that already exist in memory or whose byte length was checked
    // against quota, so they fit in usize.
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn view<B: Backend>(t: &Tensor<B>) -> View<'_, B> {
    View::new(&t.region, 0, backend_dtype(t.desc.dtype()), as_usize(t.desc.elements()))
}

/// Issues one node's work.
fn run_node<B: Backend>(
    b: &B,
    node: &ExecNode,
    ins: &[&Tensor<B>],
    out: &Tensor<B>,
) -> djinn_backend::error::Result<()> {
    let s = b.default_stream();
    let o = view(out);
    match node.op {
        ExecOp::Add => b.binary(s, BinaryOp::Add, view(ins[0]), view(ins[1]), o),
        ExecOp::Sub => b.binary(s, BinaryOp::Sub, view(ins[0]), view(ins[1]), o),
        ExecOp::Mul => b.binary(s, BinaryOp::Mul, view(ins[0]), view(ins[1]), o),
        ExecOp::Div => b.binary(s, BinaryOp::Div, view(ins[0]), view(ins[1]), o),
        ExecOp::SiluMul => b.silu_mul(s, view(ins[0]), view(ins[1]), o),
        ExecOp::Silu => b.unary(s, UnaryOp::Silu, view(ins[0]), o),
        ExecOp::Exp => b.unary(s, UnaryOp::Exp, view(ins[0]), o),
        ExecOp::Neg => b.unary(s, UnaryOp::Neg, view(ins[0]), o),
        ExecOp::Sqrt => b.unary(s, UnaryOp::Sqrt, view(ins[0]), o),
        ExecOp::Softmax => {
            let cols = as_usize(ins[0].desc.shape().last().copied().unwrap_or(1));
            b.softmax(s, view(ins[0]), o, cols)
        }
        ExecOp::RmsNorm => {
            let hidden = as_usize(ins[1].desc.elements());
            let eps = node.attrs_f32.first().copied().unwrap_or(RMS_EPS_DEFAULT);
            b.rms_norm(s, view(ins[0]), None, view(ins[1]), o, hidden, eps)
        }
        ExecOp::MatMul => {
            let (sa, sb) = (ins[0].desc.shape(), ins[1].desc.shape());
            let (m, k) = (as_usize(sa[sa.len() - 2]), as_usize(sa[sa.len() - 1]));
            let n = as_usize(sb[sb.len() - 1]);
            let batch = as_usize(sa[..sa.len() - 2].iter().product());
            let b_batch = as_usize(sb[..sb.len() - 2].iter().product());
            let args = GemmArgs {
                m,
                n,
                k,
                trans_b: false,
                batch,
                stride_a: m * k,
                stride_b: if b_batch == 1 { 0 } else { k * n },
                stride_c: m * n,
                alpha: 1.0,
                beta: 0.0,
            };
            b.gemm(s, view(ins[0]), view(ins[1]), o, &args)
        }
        ExecOp::Reshape | ExecOp::Copy => b.copy(s, &ins[0].region, 0, &out.region, 0, as_usize(out.desc.byte_len())),
        ExecOp::Cast if ins[0].desc.dtype() == out.desc.dtype() => {
            b.copy(s, &ins[0].region, 0, &out.region, 0, as_usize(out.desc.byte_len()))
        }
        ExecOp::Cast => b.cast(s, view(ins[0]), o),
        ExecOp::Embedding => {
            let hidden = as_usize(ins[0].desc.shape()[1]);
            b.embedding(s, view(ins[0]), view(ins[1]), o, hidden)
        }
        ExecOp::Gelu | ExecOp::Scale | ExecOp::Transpose | ExecOp::Sum | ExecOp::Rope => {
            Err(djinn_backend::BackendError::Unsupported { op: node.op.name(), why: "not wired".into() })
        }
    }
}

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
            descs.push(infer(node, &ins).map_err(|(st, why)| ExecError::at(i, node.op, st, why))?);
        }

        // Pass 2: quota for every node, regions, ops.
        let total_bytes = descs.iter().fold(0u64, |acc, d| acc.saturating_add(d.byte_len()));
        let mut res = store.reserve(tenant, req.outputs.len(), total_bytes)?;
        let mut outs: Vec<Tensor<B>> = Vec::with_capacity(descs.len());
        for d in &descs {
            outs.push(Tensor { desc: *d, region: store.alloc(d)? });
        }
        let backend = store.backend();
        for (i, node) in req.nodes.iter().enumerate() {
            let (done, rest) = outs.split_at(i);
            let mut ins: Vec<&Tensor<B>> = Vec::with_capacity(node.inputs.len());
            for input in &node.inputs {
                ins.push(match *input {
                    ExecInput::Handle(h) => table.get(h)?,
                    ExecInput::Node(j) => &done[j as usize],
                });
            }
            run_node(backend, node, &ins, &rest[0]).map_err(|e| ExecError::at(i, node.op, backend_status(&e), e))?;
        }
        backend
            .sync_stream(backend.default_stream())
            .map_err(|e| ExecError { status: backend_status(&e), message: format!("exec: {e}") })?;

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
