//! Exec pass 2: issuing one node's ops on a lane's backend, composed from [`Backend`] trait
//! calls only (layout ops as device copies of contiguous runs; small constants written into
//! temporaries that outlive the stream's synchronisation).

use djinn_backend::{Backend, BinaryOp, GemmArgs, UnaryOp, View};
use djinn_proto::msg::{ExecNode, ExecOp};
use djinn_proto::Status;

use super::infer::{bad_arg, dim_index, is_float, product, rope_dims, split_at_dim, swapped_dims};
use super::NodeResult;
use crate::tensors::{backend_dtype, backend_status, Tensor};

/// Default RMSNorm epsilon when the node carries no f32 attribute.
const RMS_EPS_DEFAULT: f32 = 1e-5;

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

/// A temporary region holding `values` as f32 (at least one byte, as [`crate::tensors::Store::alloc`] does).
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
pub(super) fn run_node<B: Backend>(
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
