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

/// Most device copies one layout node may issue. Each is a driver call on a GPU, so an op that
/// would move data in more (smaller) runs than this is refused rather than left to crawl.
pub const NODE_COPIES_MAX: u64 = 1 << 20;

/// A refusal or failure of one node: the status and why.
type NodeResult<T> = Result<T, (Status, String)>;

/// What pass 1 knows of a node: its output and the bytes of temporaries it will write.
struct Planned {
    desc: TensorDesc,
    temp_bytes: u64,
}

fn planned(desc: TensorDesc) -> Planned {
    Planned { desc, temp_bytes: 0 }
}

fn desc(dtype: DType, shape: &[u64]) -> Result<TensorDesc, String> {
    TensorDesc::new(dtype, shape).map_err(|e| e.to_string())
}

fn last_dim(d: &TensorDesc) -> Result<u64, String> {
    d.shape().last().copied().ok_or_else(|| "needs at least one dimension".to_string())
}

fn same_dtype(a: &TensorDesc, b: &TensorDesc) -> NodeResult<()> {
    if a.dtype() != b.dtype() {
        return Err((Status::DTypeMismatch, format!("dtypes differ: {} vs {}", a.dtype().name(), b.dtype().name())));
    }
    Ok(())
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16)
}

fn float_only(d: &TensorDesc) -> NodeResult<()> {
    if is_float(d.dtype()) {
        Ok(())
    } else {
        Err((Status::DTypeMismatch, format!("needs a float tensor, got {}", d.dtype().name())))
    }
}

fn dtype_is(d: &TensorDesc, want: DType, what: &str) -> NodeResult<()> {
    if d.dtype() != want {
        return Err((Status::DTypeMismatch, format!("{what} must be {}, got {}", want.name(), d.dtype().name())));
    }
    Ok(())
}

fn shape_err(s: String) -> (Status, String) {
    (Status::ShapeMismatch, s)
}

fn bad_arg(s: impl Into<String>) -> (Status, String) {
    (Status::BadArgument, s.into())
}

/// Inputs each op takes: (fewest, most).
fn arity(op: ExecOp) -> (usize, usize) {
    match op {
        ExecOp::MatMul | ExecOp::Add | ExecOp::Sub | ExecOp::Mul | ExecOp::Div | ExecOp::SiluMul => (2, 2),
        ExecOp::RmsNorm | ExecOp::Embedding | ExecOp::Gather => (2, 2),
        ExecOp::Rope | ExecOp::Linear => (2, 3),
        ExecOp::Concat => (2, 8),
        _ => (1, 1),
    }
}

/// At most `N` i64 attributes; missing ones read as `None`.
fn attrs_upto<const N: usize>(node: &ExecNode) -> NodeResult<[Option<i64>; N]> {
    let got = node.attrs_i64.len();
    if got > N {
        return Err(bad_arg(format!("takes at most {N} i64 attributes, got {got}")));
    }
    let mut out = [None; N];
    for (o, &a) in out.iter_mut().zip(&node.attrs_i64) {
        *o = Some(a);
    }
    Ok(out)
}

/// Exactly `N` i64 attributes.
fn attrs_exact<const N: usize>(node: &ExecNode) -> NodeResult<[i64; N]> {
    <[i64; N]>::try_from(node.attrs_i64.as_slice())
        .map_err(|_| bad_arg(format!("takes {N} i64 attributes, got {}", node.attrs_i64.len())))
}

/// A dimension index attribute (negative counts from the end) checked against `rank`.
fn dim_index(d: i64, rank: usize) -> NodeResult<usize> {
    let r = rank as i64;
    let at = if d < 0 { d + r } else { d };
    if at < 0 || at >= r {
        return Err(bad_arg(format!("dimension {d} is outside rank {rank}")));
    }
    Ok(at as usize)
}

/// The two dimensions a `SwapDims` (attrs `[dim0, dim1]`) or `Transpose` (no attrs: the last
/// two) node swaps, as (lower, higher) indices.
fn swapped_dims(node: &ExecNode, rank: usize) -> NodeResult<(usize, usize)> {
    let (x, y) = if node.op == ExecOp::Transpose {
        if !node.attrs_i64.is_empty() {
            return Err(bad_arg("Transpose takes no attributes (SwapDims names the dimensions)"));
        }
        if rank < 2 {
            return Err(bad_arg(format!("Transpose needs rank 2 or more, got {rank}")));
        }
        (rank - 2, rank - 1)
    } else {
        let [d0, d1] = attrs_exact::<2>(node)?;
        (dim_index(d0, rank)?, dim_index(d1, rank)?)
    };
    Ok((x.min(y), x.max(y)))
}

fn product(dims: &[u64]) -> u64 {
    // Saturating: a shape with a zero extent is valid however large its other extents, so a
    // sub-product may not fit. Saturated counts are refused by the bounds they feed.
    dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
}

/// `shape` split at `dim`: (elements before it, its extent, elements after it).
fn split_at_dim(shape: &[u64], dim: usize) -> (u64, u64, u64) {
    (product(&shape[..dim]), shape[dim], product(&shape[dim + 1..]))
}

fn copies_ok(copies: u64) -> NodeResult<()> {
    if copies > NODE_COPIES_MAX {
        return Err((
            Status::LimitExceeded,
            format!("needs {copies} separate copies, more than the limit of {NODE_COPIES_MAX}"),
        ));
    }
    Ok(())
}

/// The output descriptor of one node from its input descriptors, or why it cannot run.
fn infer(node: &ExecNode, ins: &[TensorDesc]) -> NodeResult<Planned> {
    let (lo, hi) = arity(node.op);
    if ins.len() < lo || ins.len() > hi {
        let want = if lo == hi { lo.to_string() } else { format!("{lo} to {hi}") };
        return Err(bad_arg(format!("takes {want} inputs, got {}", ins.len())));
    }
    let a = &ins[0];
    match node.op {
        ExecOp::Add | ExecOp::Sub | ExecOp::Mul | ExecOp::Div | ExecOp::SiluMul => {
            same_dtype(a, &ins[1])?;
            float_only(a)?;
            if a.shape() != ins[1].shape() {
                return Err(shape_err(format!("shapes differ: {:?} vs {:?}", a.shape(), ins[1].shape())));
            }
            Ok(planned(*a))
        }
        ExecOp::Silu | ExecOp::Exp | ExecOp::Neg | ExecOp::Sqrt => {
            float_only(a)?;
            Ok(planned(*a))
        }
        ExecOp::Softmax => {
            float_only(a)?;
            last_dim(a).map_err(shape_err)?;
            Ok(planned(*a))
        }
        ExecOp::Scale => {
            float_only(a)?;
            match node.attrs_f32.as_slice() {
                [f] if f.is_finite() => Ok(Planned { desc: *a, temp_bytes: 4 }),
                _ => Err(bad_arg("takes one finite f32 attribute, the factor")),
            }
        }
        ExecOp::Sum => {
            float_only(a)?;
            let cols = last_dim(a).map_err(shape_err)?;
            let out = desc(a.dtype(), &a.shape()[..a.rank() - 1]).map_err(shape_err)?;
            Ok(Planned { desc: out, temp_bytes: cols.saturating_mul(4) })
        }
        ExecOp::RmsNorm => {
            let w = &ins[1];
            float_only(a)?;
            float_only(w)?;
            let hidden = last_dim(a).map_err(shape_err)?;
            if w.shape() != [hidden] {
                return Err(shape_err(format!("weight {:?} must be [{hidden}]", w.shape())));
            }
            Ok(planned(*a))
        }
        ExecOp::MatMul => {
            let b = &ins[1];
            float_only(a)?;
            float_only(b)?;
            let [trans] = attrs_upto::<1>(node)?;
            let trans_b = match trans {
                None | Some(0) => false,
                Some(1) => true,
                Some(t) => return Err(bad_arg(format!("transpose flag must be 0 or 1, got {t}"))),
            };
            let (sa, sb) = (a.shape(), b.shape());
            if sa.len() < 2 || sb.len() < 2 {
                return Err(shape_err(format!("needs rank ≥ 2 operands, got {sa:?} × {sb:?}")));
            }
            let (m, k) = (sa[sa.len() - 2], sa[sa.len() - 1]);
            let (mut k2, mut n) = (sb[sb.len() - 2], sb[sb.len() - 1]);
            if trans_b {
                std::mem::swap(&mut k2, &mut n);
            }
            if k != k2 {
                return Err(shape_err(format!("inner dimensions differ: {sa:?} × {sb:?} (transposed: {trans_b})")));
            }
            let (ba, bb) = (&sa[..sa.len() - 2], &sb[..sb.len() - 2]);
            // b's batch dims must equal a's, or b is one matrix shared by every batch entry.
            if ba != bb && product(bb) != 1 {
                return Err(shape_err(format!("batch dimensions differ: {sa:?} × {sb:?}")));
            }
            let mut shape = ba.to_vec();
            shape.extend([m, n]);
            desc(a.dtype(), &shape).map_err(shape_err).map(planned)
        }
        ExecOp::Linear => {
            let w = &ins[1];
            float_only(a)?;
            float_only(w)?;
            let k = last_dim(a).map_err(shape_err)?;
            if w.rank() != 2 || w.shape()[1] != k {
                return Err(shape_err(format!("weight {:?} must be [rows, {k}] for x {:?}", w.shape(), a.shape())));
            }
            let rows = w.shape()[0];
            let n = match *node.attrs_i64.as_slice() {
                [] => rows,
                [s, n] if s >= 0 && n >= 0 && (s as u64).checked_add(n as u64).is_some_and(|e| e <= rows) => n as u64,
                [s, n] => return Err(bad_arg(format!("row window {s}+{n} is outside {rows} rows"))),
                _ => return Err(bad_arg("takes no i64 attributes or [start, rows]")),
            };
            if let Some(bias) = ins.get(2) {
                float_only(bias)?;
                if bias.shape() != [rows] {
                    return Err(shape_err(format!("bias {:?} must be [{rows}]", bias.shape())));
                }
            }
            let mut shape = a.shape().to_vec();
            *shape.last_mut().expect("rank checked") = n;
            desc(a.dtype(), &shape).map_err(shape_err).map(planned)
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
                    d => return Err(bad_arg(format!("bad dimension {d} in new shape"))),
                }
            }
            let known: u64 = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| shape_err("new shape overflows".to_string()))?;
            if let Some(i) = infer_at {
                if known == 0 || !a.elements().is_multiple_of(known) {
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
            Ok(planned(out))
        }
        ExecOp::Copy => Ok(planned(*a)),
        ExecOp::Cast => {
            let code = node.attrs_i64.first().copied().ok_or_else(|| bad_arg("needs the target dtype"))?;
            let to = u8::try_from(code)
                .ok()
                .and_then(|c| DType::try_from(c).ok())
                .ok_or_else(|| bad_arg(format!("unknown dtype code {code}")))?;
            desc(to, a.shape()).map_err(shape_err).map(planned)
        }
        ExecOp::Embedding => {
            dtype_is(&ins[1], DType::I32, "ids")?;
            if a.rank() != 2 {
                return Err(shape_err(format!("table must be [vocab, hidden], got {:?}", a.shape())));
            }
            infer_gather(a, &ins[1], 0)
        }
        ExecOp::Gather => {
            dtype_is(&ins[1], DType::I32, "ids")?;
            if a.rank() == 0 {
                return Err(shape_err("table needs at least one dimension".into()));
            }
            let [dim] = attrs_upto::<1>(node)?;
            infer_gather(a, &ins[1], dim_index(dim.unwrap_or(0), a.rank())?)
        }
        ExecOp::Rope => {
            float_only(a)?;
            let (tokens, _, hd) = rope_dims(a)?;
            let pos = &ins[1];
            dtype_is(pos, DType::I32, "positions")?;
            if pos.elements() != tokens {
                return Err(shape_err(format!("{:?} positions for x {:?}: want {tokens}", pos.shape(), a.shape())));
            }
            if let Some(f) = ins.get(2) {
                dtype_is(f, DType::F32, "inv_freq")?;
                if f.shape() != [hd / 2] {
                    return Err(shape_err(format!("inv_freq {:?} must be [{}]", f.shape(), hd / 2)));
                }
                if !node.attrs_f32.is_empty() {
                    return Err(bad_arg("takes theta or an inv_freq input, not both"));
                }
                Ok(planned(*a))
            } else {
                match node.attrs_f32.as_slice() {
                    [t] if t.is_finite() && *t > 0.0 => {
                        Ok(Planned { desc: *a, temp_bytes: (hd / 2).saturating_mul(4) })
                    }
                    _ => Err(bad_arg("needs theta (one finite f32 attribute > 0) or an inv_freq input")),
                }
            }
        }
        ExecOp::Slice => {
            let [d, start, len] = attrs_exact::<3>(node)?;
            let dim = dim_index(d, a.rank())?;
            let (outer, extent, _) = split_at_dim(a.shape(), dim);
            if start < 0 || len < 0 || (start as u64).checked_add(len as u64).is_none_or(|e| e > extent) {
                return Err(bad_arg(format!("slice {start}+{len} is outside dimension {dim} of {:?}", a.shape())));
            }
            copies_ok(outer)?;
            let mut shape = a.shape().to_vec();
            shape[dim] = len as u64;
            desc(a.dtype(), &shape).map_err(shape_err).map(planned)
        }
        ExecOp::Concat => {
            let [d] = attrs_exact::<1>(node)?;
            let dim = dim_index(d, a.rank())?;
            let mut total = 0u64;
            for (i, x) in ins.iter().enumerate() {
                same_dtype(a, x)?;
                let same_rest = x.rank() == a.rank()
                    && x.shape().iter().zip(a.shape()).enumerate().all(|(j, (p, q))| j == dim || p == q);
                if !same_rest {
                    return Err(shape_err(format!(
                        "input {i} {:?} differs from input 0 {:?} outside dimension {dim}",
                        x.shape(),
                        a.shape()
                    )));
                }
                total = total.checked_add(x.shape()[dim]).ok_or_else(|| shape_err("joined size overflows".into()))?;
            }
            copies_ok(product(&a.shape()[..dim]).saturating_mul(ins.len() as u64))?;
            let mut shape = a.shape().to_vec();
            shape[dim] = total;
            desc(a.dtype(), &shape).map_err(shape_err).map(planned)
        }
        ExecOp::SwapDims | ExecOp::Transpose => {
            let (lo, hi) = swapped_dims(node, a.rank())?;
            let s = a.shape();
            if lo != hi && s[lo] != 1 && s[hi] != 1 {
                copies_ok(product(&s[..=hi]))?;
            }
            let mut shape = s.to_vec();
            shape.swap(lo, hi);
            desc(a.dtype(), &shape).map_err(shape_err).map(planned)
        }
        ExecOp::CausalMask => {
            float_only(a)?;
            if a.rank() < 2 {
                return Err(shape_err(format!("needs [.., q, k] scores, got {:?}", a.shape())));
            }
            let (q, k) = (a.shape()[a.rank() - 2], a.shape()[a.rank() - 1]);
            let [offset] = attrs_upto::<1>(node)?;
            match offset {
                Some(o) if o < 0 => return Err(bad_arg(format!("offset {o} is negative"))),
                None if q > k => return Err(shape_err(format!("{q} queries over {k} keys need an explicit offset"))),
                _ => {}
            }
            let mask = q.saturating_mul(k);
            let cast = if a.dtype() == DType::F32 { 0 } else { mask.saturating_mul(a.dtype().size_bytes() as u64) };
            Ok(Planned { desc: *a, temp_bytes: mask.saturating_mul(4).saturating_add(cast) })
        }
        ExecOp::Argmax => {
            float_only(a)?;
            let cols = last_dim(a).map_err(shape_err)?;
            if cols == 0 && product(&a.shape()[..a.rank() - 1]) > 0 {
                return Err(shape_err(format!("argmax over an empty last dimension of {:?}", a.shape())));
            }
            desc(DType::I32, &a.shape()[..a.rank() - 1]).map_err(shape_err).map(planned)
        }
        ExecOp::Gelu => Err((Status::Unsupported, "not implemented by this server's backends yet".into())),
    }
}

/// `x` of Rope as (tokens, heads, head_dim).
fn rope_dims(x: &TensorDesc) -> NodeResult<(u64, u64, u64)> {
    let s = x.shape();
    let (tokens, heads, hd) = match s.len() {
        0 | 1 => return Err(shape_err(format!("x {s:?} must be [tokens, head_dim] or [.., heads, head_dim]"))),
        2 => (s[0], 1, s[1]),
        r => (product(&s[..r - 2]), s[r - 2], s[r - 1]),
    };
    if hd == 0 || hd % 2 != 0 || heads == 0 {
        return Err(shape_err(format!("x {s:?} needs an even, non-zero head_dim and at least one head")));
    }
    Ok((tokens, heads, hd))
}

/// Gather of `ids` along `dim` of `table`.
fn infer_gather(table: &TensorDesc, ids: &TensorDesc, dim: usize) -> NodeResult<Planned> {
    let s = table.shape();
    let mut shape = s[..dim].to_vec();
    shape.extend_from_slice(ids.shape());
    shape.extend_from_slice(&s[dim + 1..]);
    if !(dim == 0 && is_float(table.dtype())) {
        copies_ok(product(&s[..dim]).saturating_mul(ids.elements()))?;
    }
    desc(table.dtype(), &shape).map_err(shape_err).map(planned)
}

fn as_usize(v: u64) -> usize {
    // Shapes here describe tensors that already exist in memory or whose byte length was checked
    // against quota, so they fit in usize.
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn view<B: Backend>(t: &Tensor<B>) -> View<'_, B> {
    View::new(&t.region, 0, backend_dtype(t.desc.dtype()), as_usize(t.desc.elements()))
}

fn bk(e: djinn_backend::BackendError) -> (Status, String) {
    (backend_status(&e), e.to_string())
}

/// A temporary region holding `values` as f32 (at least one byte, as [`Store::alloc`] does).
fn temp_f32<B: Backend>(b: &B, values: &[f32]) -> NodeResult<B::Region> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let r = b.reserve(bytes.len().max(1)).map_err(bk)?;
    b.write(&r, 0, &bytes).map_err(bk)?;
    Ok(r)
}

/// RoPE inverse frequencies `theta^(-2i/d)` as Hugging Face's default rotary embedding computes
/// them (the exponent in f32, the power in f64).
fn default_inv_freq(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let exponent = ((2 * i) as f32) / (head_dim as f32);
            (1.0f64 / (theta as f64).powf(exponent as f64)) as f32
        })
        .collect()
}

/// Copies `runs` contiguous runs of `run_bytes`, run `i` from `src_at(i)` to `dst_at(i)` (bytes).
fn copy_runs<B: Backend>(
    b: &B,
    src: &B::Region,
    dst: &B::Region,
    runs: usize,
    run_bytes: usize,
    mut at: impl FnMut(usize) -> (usize, usize),
) -> NodeResult<()> {
    if run_bytes == 0 {
        return Ok(());
    }
    let s = b.default_stream();
    for i in 0..runs {
        let (from, to) = at(i);
        b.copy(s, src, from, dst, to, run_bytes).map_err(bk)?;
    }
    Ok(())
}

/// Issues one node's work. Temporaries the device may still read go to `temps`.
fn run_node<B: Backend>(
    b: &B,
    node: &ExecNode,
    ins: &[&Tensor<B>],
    out: &Tensor<B>,
    temps: &mut Vec<B::Region>,
) -> NodeResult<()> {
    if out.desc.elements() == 0 {
        return Ok(());
    }
    let s = b.default_stream();
    let o = view(out);
    let es = out.desc.dtype().size_bytes();
    match node.op {
        ExecOp::Add => b.binary(s, BinaryOp::Add, view(ins[0]), view(ins[1]), o).map_err(bk),
        ExecOp::Sub => b.binary(s, BinaryOp::Sub, view(ins[0]), view(ins[1]), o).map_err(bk),
        ExecOp::Mul => b.binary(s, BinaryOp::Mul, view(ins[0]), view(ins[1]), o).map_err(bk),
        ExecOp::Div => b.binary(s, BinaryOp::Div, view(ins[0]), view(ins[1]), o).map_err(bk),
        ExecOp::SiluMul => b.silu_mul(s, view(ins[0]), view(ins[1]), o).map_err(bk),
        ExecOp::Silu => b.unary(s, UnaryOp::Silu, view(ins[0]), o).map_err(bk),
        ExecOp::Exp => b.unary(s, UnaryOp::Exp, view(ins[0]), o).map_err(bk),
        ExecOp::Neg => b.unary(s, UnaryOp::Neg, view(ins[0]), o).map_err(bk),
        ExecOp::Sqrt => b.unary(s, UnaryOp::Sqrt, view(ins[0]), o).map_err(bk),
        ExecOp::Softmax => {
            let cols = as_usize(ins[0].desc.shape().last().copied().unwrap_or(1));
            b.softmax(s, view(ins[0]), o, cols).map_err(bk)
        }
        ExecOp::Scale => {
            let factor = temp_f32(b, &node.attrs_f32[..1])?;
            let r = b.binary(s, BinaryOp::Mul, view(ins[0]), View::new(&factor, 0, djinn_backend::DType::F32, 1), o);
            temps.push(factor);
            r.map_err(bk)
        }
        ExecOp::Sum => {
            let cols = as_usize(ins[0].desc.shape().last().copied().unwrap_or(0));
            let rows = as_usize(out.desc.elements());
            if cols == 0 {
                // An empty sum is zero (the output is fresh and nothing else reads it yet).
                return b.write(&out.region, 0, &vec![0u8; rows * es]).map_err(bk);
            }
            let ones = temp_f32(b, &vec![1.0; cols])?;
            let w = View::new(&ones, 0, djinn_backend::DType::F32, cols);
            let r = b.gemm(s, view(ins[0]), w, o, &GemmArgs::linear(rows, 1, cols));
            temps.push(ones);
            r.map_err(bk)
        }
        ExecOp::RmsNorm => {
            let hidden = as_usize(ins[1].desc.elements());
            let eps = node.attrs_f32.first().copied().unwrap_or(RMS_EPS_DEFAULT);
            b.rms_norm(s, view(ins[0]), None, view(ins[1]), o, hidden, eps).map_err(bk)
        }
        ExecOp::MatMul => {
            let (sa, sb) = (ins[0].desc.shape(), ins[1].desc.shape());
            let trans_b = node.attrs_i64.first() == Some(&1);
            let (m, k) = (as_usize(sa[sa.len() - 2]), as_usize(sa[sa.len() - 1]));
            let n = as_usize(if trans_b { sb[sb.len() - 2] } else { sb[sb.len() - 1] });
            let batch = as_usize(product(&sa[..sa.len() - 2]));
            let b_batch = as_usize(product(&sb[..sb.len() - 2]));
            let args = GemmArgs {
                m,
                n,
                k,
                trans_b,
                batch,
                stride_a: m * k,
                stride_b: if b_batch == 1 { 0 } else { k * n },
                stride_c: m * n,
                alpha: 1.0,
                beta: 0.0,
                bf16_activations: false,
            };
            b.gemm(s, view(ins[0]), view(ins[1]), o, &args).map_err(bk)
        }
        ExecOp::Linear => {
            let (x, w) = (ins[0], ins[1]);
            let k = as_usize(x.desc.shape().last().copied().unwrap_or(0));
            let start = as_usize(node.attrs_i64.first().copied().unwrap_or(0) as u64);
            let n = as_usize(*out.desc.shape().last().expect("rank checked"));
            let rows = as_usize(out.desc.elements()) / n;
            let wdt = backend_dtype(w.desc.dtype());
            let wv = View::new(&w.region, start * k * wdt.size_bytes(), wdt, n * k);
            b.gemm(s, view(x), wv, o, &GemmArgs::linear(rows, n, k)).map_err(bk)?;
            if let Some(bias) = ins.get(2) {
                let bdt = backend_dtype(bias.desc.dtype());
                let bv = View::new(&bias.region, start * bdt.size_bytes(), bdt, n);
                b.binary(s, BinaryOp::Add, o, bv, o).map_err(bk)?;
            }
            Ok(())
        }
        ExecOp::Reshape | ExecOp::Copy => {
            b.copy(s, &ins[0].region, 0, &out.region, 0, as_usize(out.desc.byte_len())).map_err(bk)
        }
        ExecOp::Cast if ins[0].desc.dtype() == out.desc.dtype() => {
            b.copy(s, &ins[0].region, 0, &out.region, 0, as_usize(out.desc.byte_len())).map_err(bk)
        }
        ExecOp::Cast => b.cast(s, view(ins[0]), o).map_err(bk),
        ExecOp::Embedding => run_gather(b, ins[0], ins[1], 0, out),
        ExecOp::Gather => {
            let dim = dim_index(node.attrs_i64.first().copied().unwrap_or(0), ins[0].desc.rank())?;
            run_gather(b, ins[0], ins[1], dim, out)
        }
        ExecOp::Rope => {
            let (_, heads, hd) = rope_dims(&ins[0].desc)?;
            let (heads, hd) = (as_usize(heads), as_usize(hd));
            b.copy(s, &ins[0].region, 0, &out.region, 0, as_usize(out.desc.byte_len())).map_err(bk)?;
            let pos = view(ins[1]);
            match ins.get(2) {
                Some(f) => b.rope(s, o, pos, view(f), heads, hd).map_err(bk),
                None => {
                    let f = temp_f32(b, &default_inv_freq(node.attrs_f32[0], hd))?;
                    let r = b.rope(s, o, pos, View::new(&f, 0, djinn_backend::DType::F32, hd / 2), heads, hd);
                    temps.push(f);
                    r.map_err(bk)
                }
            }
        }
        ExecOp::Slice => {
            let x = ins[0];
            let dim = dim_index(node.attrs_i64[0], x.desc.rank())?;
            let (outer, extent, inner) = split_at_dim(x.desc.shape(), dim);
            let (start, len) = (node.attrs_i64[1] as u64, node.attrs_i64[2] as u64);
            let (extent, inner) = (as_usize(extent), as_usize(inner));
            let (start, len) = (as_usize(start), as_usize(len));
            copy_runs(b, &x.region, &out.region, as_usize(outer), len * inner * es, |i| {
                ((i * extent + start) * inner * es, i * len * inner * es)
            })
        }
        ExecOp::Concat => {
            let dim = dim_index(node.attrs_i64[0], out.desc.rank())?;
            let (outer, total, inner) = split_at_dim(out.desc.shape(), dim);
            let (outer, total, inner) = (as_usize(outer), as_usize(total), as_usize(inner));
            let mut at = 0usize;
            for x in ins {
                let d = as_usize(x.desc.shape()[dim]);
                copy_runs(b, &x.region, &out.region, outer, d * inner * es, |i| {
                    (i * d * inner * es, (i * total + at) * inner * es)
                })?;
                at += d;
            }
            Ok(())
        }
        ExecOp::SwapDims | ExecOp::Transpose => {
            let x = ins[0];
            let (lo, hi) = swapped_dims(node, x.desc.rank())?;
            let sh = x.desc.shape();
            if lo == hi || sh[lo] == 1 || sh[hi] == 1 {
                // Swapping a dimension of extent one keeps the element order.
                return b.copy(s, &x.region, 0, &out.region, 0, as_usize(out.desc.byte_len())).map_err(bk);
            }
            let outer = as_usize(product(&sh[..lo]));
            let (da, db) = (as_usize(sh[lo]), as_usize(sh[hi]));
            let mid = as_usize(product(&sh[lo + 1..hi]));
            let run = as_usize(product(&sh[hi + 1..])) * es;
            // Run (p, i, m, j) of x = [outer, da, mid, db, inner] goes to (p, j, m, i) of the
            // output = [outer, db, mid, da, inner].
            copy_runs(b, &x.region, &out.region, outer * da * mid * db, run, |r| {
                let (j, r2) = (r % db, r / db);
                let (m, r3) = (r2 % mid, r2 / mid);
                let (i, p) = (r3 % da, r3 / da);
                (r * run, (((p * db + j) * mid + m) * da + i) * run)
            })
        }
        ExecOp::CausalMask => {
            let x = ins[0];
            let sh = x.desc.shape();
            let (q, k) = (as_usize(sh[sh.len() - 2]), as_usize(sh[sh.len() - 1]));
            let offset = match node.attrs_i64.first() {
                Some(&o) => as_usize(o as u64),
                None => k - q,
            };
            let mut mask = vec![0f32; q * k];
            for (i, row) in mask.chunks_exact_mut(k.max(1)).enumerate() {
                let allowed = offset.saturating_add(i).saturating_add(1).min(k);
                row[allowed..].fill(f32::NEG_INFINITY);
            }
            let m32 = temp_f32(b, &mask)?;
            let xdt = backend_dtype(x.desc.dtype());
            let f32v = View::new(&m32, 0, djinn_backend::DType::F32, q * k);
            let r = if xdt == djinn_backend::DType::F32 {
                b.binary(s, BinaryOp::Add, view(x), f32v, o).map_err(bk)
            } else {
                // The mask in the scores' dtype (-inf and 0 are exact in every float type).
                let mc = b.reserve(q * k * xdt.size_bytes()).map_err(bk)?;
                let cv = View::new(&mc, 0, xdt, q * k);
                let r = b.cast(s, f32v, cv).and_then(|()| b.binary(s, BinaryOp::Add, view(x), cv, o));
                temps.push(mc);
                r.map_err(bk)
            };
            temps.push(m32);
            r
        }
        ExecOp::Argmax => {
            let cols = as_usize(ins[0].desc.shape().last().copied().unwrap_or(1));
            b.argmax(s, view(ins[0]), o, cols).map_err(bk)
        }
        ExecOp::Gelu => Err((Status::Unsupported, "not wired".into())),
    }
}

/// Gather along `dim`. The ids are read back and range-checked on the host first: device
/// kernels do not check them, and the copy path computes offsets from them.
fn run_gather<B: Backend>(b: &B, table: &Tensor<B>, ids: &Tensor<B>, dim: usize, out: &Tensor<B>) -> NodeResult<()> {
    let s = b.default_stream();
    // The ids may be an earlier node's output still being computed.
    b.sync_stream(s).map_err(bk)?;
    let mut raw = vec![0u8; as_usize(ids.desc.byte_len())];
    b.read(&ids.region, 0, &mut raw).map_err(bk)?;
    let (outer, extent, inner) = split_at_dim(table.desc.shape(), dim);
    let idx: Vec<usize> = raw
        .chunks_exact(4)
        .enumerate()
        .map(|(i, c)| {
            let id = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if id < 0 || id as u64 >= extent {
                return Err(bad_arg(format!("ids[{i}] = {id} is outside 0..{extent}")));
            }
            Ok(id as usize)
        })
        .collect::<NodeResult<_>>()?;
    let (extent, inner) = (as_usize(extent), as_usize(inner));
    if dim == 0 && is_float(table.desc.dtype()) {
        return b.embedding(s, view(table), view(ids), view(out), inner).map_err(bk);
    }
    let es = table.desc.dtype().size_bytes();
    let n = idx.len();
    copy_runs(b, &table.region, &out.region, as_usize(outer) * n, inner * es, |r| {
        let (p, j) = (r / n, r % n);
        ((p * extent + idx[j]) * inner * es, r * inner * es)
    })
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
            let p = infer(node, &ins).map_err(|(st, why)| ExecError::at(i, node.op, st, why))?;
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
            if let Err((st, why)) = run_node(backend, node, &ins, &rest[0], &mut temps) {
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
