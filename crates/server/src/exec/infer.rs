//! Exec pass 1: every node's output shape and dtype, and the bytes of temporaries it will
//! write, inferred on the host from the request and the input descriptors alone. Every mismatch
//! is a typed refusal here, before any memory is taken.

use djinn_proto::msg::{ExecNode, ExecOp};
use djinn_proto::{DType, Status, TensorDesc};

use super::{NodeResult, NODE_COPIES_MAX};

/// What pass 1 knows of a node: its output and the bytes of temporaries it will write.
pub(super) struct Planned {
    pub(super) desc: TensorDesc,
    pub(super) temp_bytes: u64,
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

pub(super) fn is_float(d: DType) -> bool {
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

pub(super) fn bad_arg(s: impl Into<String>) -> (Status, String) {
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
pub(super) fn dim_index(d: i64, rank: usize) -> NodeResult<usize> {
    let r = rank as i64;
    let at = if d < 0 { d + r } else { d };
    if at < 0 || at >= r {
        return Err(bad_arg(format!("dimension {d} is outside rank {rank}")));
    }
    Ok(at as usize)
}

/// The two dimensions a `SwapDims` (attrs `[dim0, dim1]`) or `Transpose` (no attrs: the last
/// two) node swaps, as (lower, higher) indices.
pub(super) fn swapped_dims(node: &ExecNode, rank: usize) -> NodeResult<(usize, usize)> {
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

pub(super) fn product(dims: &[u64]) -> u64 {
    // Saturating: a shape with a zero extent is valid however large its other extents, so a
    // sub-product may not fit. Saturated counts are refused by the bounds they feed.
    dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
}

/// `shape` split at `dim`: (elements before it, its extent, elements after it).
pub(super) fn split_at_dim(shape: &[u64], dim: usize) -> (u64, u64, u64) {
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
pub(super) fn infer(node: &ExecNode, ins: &[TensorDesc]) -> NodeResult<Planned> {
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
pub(super) fn rope_dims(x: &TensorDesc) -> NodeResult<(u64, u64, u64)> {
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
