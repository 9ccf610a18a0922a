//! The remote tensor ops a Llama step needs, each against a host reference through a real server
//! process, once per transport (tcp, shm): Linear (row windows, bias, bf16 weights), MatMul with
//! a transposed batched operand, Slice, Concat, SwapDims, Gather/Embedding, RoPE (theta and
//! explicit frequencies), CausalMask, Softmax over masked rows, Argmax, Scale, Sum, RMSNorm with
//! a bf16 weight — and the typed refusals of bad shapes, dtypes, attributes and ids.

mod common;

use common::{assert_close, connect, run_trials, server, status_of, Transport};
use djinn_client::Client;
use djinn_proto::{DType, ExecInput, ExecNode, ExecOp, ExecReq, Status, TensorDesc};
use half::bf16;

fn node(op: ExecOp, inputs: &[u64], i64s: &[i64], f32s: &[f32]) -> ExecNode {
    let ins: Vec<ExecInput> = inputs.iter().map(|&h| ExecInput::Handle(h)).collect();
    let mut n = ExecNode::new(op, &ins);
    n.attrs_i64.extend_from_slice(i64s);
    n.attrs_f32.extend_from_slice(f32s);
    n
}

/// Runs one node; returns its output's shape and f32 values.
fn run_f32(c: &mut Client, n: ExecNode) -> (Vec<u64>, Vec<f32>) {
    let out = c.exec(&ExecReq::single(n)).unwrap();
    let (d, v) = c.get_f32(out[0].0).unwrap();
    c.free(&[out[0].0]).unwrap();
    (d.shape().to_vec(), v)
}

fn run_i32(c: &mut Client, n: ExecNode) -> (Vec<u64>, Vec<i32>) {
    let out = c.exec(&ExecReq::single(n)).unwrap();
    let (d, bytes) = c.get(out[0].0).unwrap();
    assert_eq!(d.dtype(), DType::I32);
    c.free(&[out[0].0]).unwrap();
    (d.shape().to_vec(), bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect())
}

fn put_i32(c: &mut Client, shape: &[u64], v: &[i32]) -> u64 {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    c.put(TensorDesc::new(DType::I32, shape).unwrap(), &bytes).unwrap()
}

fn put_bf16(c: &mut Client, shape: &[u64], v: &[f32]) -> u64 {
    let bytes: Vec<u8> = v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect();
    c.put(TensorDesc::new(DType::BF16, shape).unwrap(), &bytes).unwrap()
}

fn vals(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + 1.0) * seed).sin()).collect()
}

/// Row-major element offset of `idx` in `shape`.
fn offset(shape: &[usize], idx: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (i, d)| acc * d + i)
}

/// Every index of `shape` in row-major order.
fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![vec![]];
    for &d in shape {
        out = out.into_iter().flat_map(|p| (0..d).map(move |i| [p.clone(), vec![i]].concat())).collect();
    }
    out
}

fn linear_and_matmul(t: Transport) {
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    let (rows, k, wrows) = (3usize, 8usize, 10usize);
    let x = vals(rows * k, 0.37);
    let w = vals(wrows * k, 0.11);
    let bias = vals(wrows, 0.7);
    let hx = c.put_f32(&[rows as u64, k as u64], &x).unwrap();
    let hw = c.put_f32(&[wrows as u64, k as u64], &w).unwrap();
    let hwb = put_bf16(&mut c, &[wrows as u64, k as u64], &w);
    let hb = c.put_f32(&[wrows as u64], &bias).unwrap();
    let want = |start: usize, n: usize, with_bias: bool, wv: &[f32]| -> Vec<f32> {
        let mut out = Vec::new();
        for r in 0..rows {
            for j in start..start + n {
                let dot: f32 = (0..k).map(|p| x[r * k + p] * wv[j * k + p]).sum();
                out.push(dot + if with_bias { bias[j] } else { 0.0 });
            }
        }
        out
    };
    let (s, v) = run_f32(&mut c, node(ExecOp::Linear, &[hx, hw], &[], &[]));
    assert_eq!(s, [3, 10]);
    assert_close(&v, &want(0, wrows, false, &w), 1e-5, "linear");
    let (s, v) = run_f32(&mut c, node(ExecOp::Linear, &[hx, hw, hb], &[4, 5], &[]));
    assert_eq!(s, [3, 5]);
    assert_close(&v, &want(4, 5, true, &w), 1e-5, "linear window + bias");
    let wr: Vec<f32> = w.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
    let (_, v) = run_f32(&mut c, node(ExecOp::Linear, &[hx, hwb], &[2, 6], &[]));
    assert_close(&v, &want(2, 6, false, &wr), 1e-5, "linear with bf16 weight");

    // Batched scores q · kᵀ: [2, 3, 4] × [2, 5, 4]ᵀ → [2, 3, 5].
    let q = vals(2 * 3 * 4, 0.3);
    let kk = vals(2 * 5 * 4, 0.17);
    let hq = c.put_f32(&[2, 3, 4], &q).unwrap();
    let hk = c.put_f32(&[2, 5, 4], &kk).unwrap();
    let (s, v) = run_f32(&mut c, node(ExecOp::MatMul, &[hq, hk], &[1], &[]));
    assert_eq!(s, [2, 3, 5]);
    let mut want = Vec::new();
    for b in 0..2 {
        for i in 0..3 {
            for j in 0..5 {
                want.push((0..4).map(|p| q[(b * 3 + i) * 4 + p] * kk[(b * 5 + j) * 4 + p]).sum());
            }
        }
    }
    assert_close(&v, &want, 1e-5, "matmul transposed b");
    // Refusals: window past the rows, wrong inner size, a non-float weight, a bad flag.
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::Linear, &[hx, hw], &[8, 3], &[])))), Status::BadArgument);
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::Linear, &[hx, hw], &[1], &[])))), Status::BadArgument);
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::Linear, &[hq, hw], &[], &[])))), Status::ShapeMismatch);
    let hi = put_i32(&mut c, &[10, 8], &[0; 80]);
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::Linear, &[hx, hi], &[], &[])))), Status::DTypeMismatch);
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::MatMul, &[hq, hk], &[2], &[])))), Status::BadArgument);
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::MatMul, &[hq, hk], &[], &[])))), Status::ShapeMismatch);
}

fn slice_concat_swapdims(t: Transport) {
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    let shape = [2usize, 3, 4, 5];
    let x: Vec<f32> = (0..120).map(|i| i as f32).collect();
    let hx = c.put_f32(&[2, 3, 4, 5], &x).unwrap();
    // Slice dim 2 (also as -2), rows 1..3.
    for d in [2i64, -2] {
        let (s, v) = run_f32(&mut c, node(ExecOp::Slice, &[hx], &[d, 1, 2], &[]));
        assert_eq!(s, [2, 3, 2, 5]);
        let want: Vec<f32> =
            indices(&[2, 3, 2, 5]).iter().map(|i| x[offset(&shape, &[i[0], i[1], i[2] + 1, i[3]])]).collect();
        assert_eq!(v, want, "slice dim {d}");
    }
    // Concat three tensors along dim 1.
    let y: Vec<f32> = (0..40).map(|i| 1000.0 + i as f32).collect();
    let hy = c.put_f32(&[2, 1, 4, 5], &y).unwrap();
    let (s, v) = run_f32(&mut c, node(ExecOp::Concat, &[hy, hx, hy], &[1], &[]));
    assert_eq!(s, [2, 5, 4, 5]);
    let want: Vec<f32> = indices(&[2, 5, 4, 5])
        .iter()
        .map(|i| match i[1] {
            0 | 4 => y[offset(&[2, 1, 4, 5], &[i[0], 0, i[2], i[3]])],
            m => x[offset(&shape, &[i[0], m - 1, i[2], i[3]])],
        })
        .collect();
    assert_eq!(v, want, "concat");
    // SwapDims of every pair (dims 1,3 leave a middle dimension; 2,3 the last two).
    for (a, b) in [(0i64, 1i64), (1, 3), (2, 3), (3, 0), (-1, -3)] {
        let (ua, ub) = ((a.rem_euclid(4)) as usize, (b.rem_euclid(4)) as usize);
        let mut out_shape = shape;
        out_shape.swap(ua, ub);
        let (s, v) = run_f32(&mut c, node(ExecOp::SwapDims, &[hx], &[a, b], &[]));
        assert_eq!(s, out_shape.iter().map(|&d| d as u64).collect::<Vec<_>>());
        let want: Vec<f32> = indices(&out_shape)
            .iter()
            .map(|i| {
                let mut src = i.clone();
                src.swap(ua, ub);
                x[offset(&shape, &src)]
            })
            .collect();
        assert_eq!(v, want, "swap {a},{b}");
    }
    // Transpose is SwapDims of the last two.
    let swapped = run_f32(&mut c, node(ExecOp::SwapDims, &[hx], &[-2, -1], &[]));
    assert_eq!(run_f32(&mut c, node(ExecOp::Transpose, &[hx], &[], &[])), swapped, "transpose");
    // A swap with an extent-one dimension keeps the order.
    let (s, v) = run_f32(&mut c, node(ExecOp::SwapDims, &[hy], &[1, 2], &[]));
    assert_eq!((s, v), (vec![2, 4, 1, 5], y.clone()));
    // Refusals.
    let bad = |c: &mut Client, op, ins: &[u64], i: &[i64]| status_of(c.exec(&ExecReq::single(node(op, ins, i, &[]))));
    assert_eq!(bad(&mut c, ExecOp::Slice, &[hx], &[2, 3, 2]), Status::BadArgument, "slice past the end");
    assert_eq!(bad(&mut c, ExecOp::Slice, &[hx], &[4, 0, 1]), Status::BadArgument, "slice dim out of rank");
    assert_eq!(bad(&mut c, ExecOp::Slice, &[hx], &[0, 0]), Status::BadArgument, "slice attrs");
    assert_eq!(bad(&mut c, ExecOp::Concat, &[hx, hy], &[0]), Status::ShapeMismatch, "concat other dims differ");
    let hi = put_i32(&mut c, &[2, 1, 4, 5], &[0; 40]);
    assert_eq!(bad(&mut c, ExecOp::Concat, &[hx, hi], &[1]), Status::DTypeMismatch, "concat dtypes");
    assert_eq!(bad(&mut c, ExecOp::Concat, &[hx], &[1]), Status::BadArgument, "concat of one");
    assert_eq!(bad(&mut c, ExecOp::SwapDims, &[hx], &[0]), Status::BadArgument, "swap attrs");
    // A swap that would take more copies than the bound is refused before anything runs.
    let big = c.put_f32(&[1100, 1000], &vec![0.0; 1_100_000]).unwrap();
    assert_eq!(bad(&mut c, ExecOp::SwapDims, &[big], &[0, 1]), Status::LimitExceeded, "copy bound");
    assert_eq!(bad(&mut c, ExecOp::Transpose, &[hx], &[0]), Status::BadArgument, "transpose attrs");
    assert_eq!(bad(&mut c, ExecOp::Gelu, &[hx], &[]), Status::Unsupported);
    // Empty tensors with huge other extents: shapes come out right, nothing runs or overflows.
    let empty = c.put(TensorDesc::new(DType::F32, &[0, 1 << 40, 1 << 20]).unwrap(), &[]).unwrap();
    for (op, ins, attrs, want) in [
        (ExecOp::SwapDims, vec![empty], vec![1, 2], vec![0, 1 << 20, 1 << 40]),
        (ExecOp::Slice, vec![empty], vec![1, 5, 7], vec![0, 7, 1 << 20]),
        (ExecOp::Concat, vec![empty, empty], vec![2], vec![0, 1 << 40, 2 << 20]),
        (ExecOp::CausalMask, vec![empty], vec![3], vec![0, 1 << 40, 1 << 20]),
    ] {
        let out = c.exec(&ExecReq::single(node(op, &ins, &attrs, &[]))).unwrap();
        assert_eq!(out[0].1.shape(), want, "{}", op.name());
        c.free(&[out[0].0]).unwrap();
    }
}

fn gather_and_embedding(t: Transport) {
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    let table: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
    let ht = c.put_f32(&[4, 3, 2], &table).unwrap();
    let ids = [3, 0, 3, 1];
    let hids = put_i32(&mut c, &[2, 2], &ids);
    // Dim 0: rows of [3, 2].
    let (s, v) = run_f32(&mut c, node(ExecOp::Gather, &[ht, hids], &[], &[]));
    assert_eq!(s, [2, 2, 3, 2]);
    let want: Vec<f32> = ids.iter().flat_map(|&i| table[i as usize * 6..i as usize * 6 + 6].to_vec()).collect();
    assert_eq!(v, want, "gather dim 0");
    // Dim 1 (index-select in the middle): [4, 2, 2, 2].
    let hid1 = put_i32(&mut c, &[2, 2], &[2, 0, 1, 2]);
    let (s, v) = run_f32(&mut c, node(ExecOp::Gather, &[ht, hid1], &[1], &[]));
    assert_eq!(s, [4, 2, 2, 2]);
    let sel = [2usize, 0, 1, 2];
    let want: Vec<f32> =
        indices(&[4, 4, 2]).iter().map(|i| table[offset(&[4, 3, 2], &[i[0], sel[i[1]], i[2]])]).collect();
    assert_eq!(v, want, "gather dim 1");
    // An integer table takes the copy path.
    let hit = put_i32(&mut c, &[4], &[10, 11, 12, 13]);
    let (s, v) = run_i32(&mut c, node(ExecOp::Gather, &[hit, hids], &[], &[]));
    assert_eq!((s, v), (vec![2, 2], vec![13, 10, 13, 11]));
    // Embedding of a bf16 table keeps the table's dtype.
    let emb: Vec<f32> = (0..12).map(|i| i as f32 - 3.0).collect();
    let he = put_bf16(&mut c, &[4, 3], &emb);
    let hflat = put_i32(&mut c, &[3], &[2, 2, 0]);
    let out = c.exec(&ExecReq::single(node(ExecOp::Embedding, &[he, hflat], &[], &[]))).unwrap();
    assert_eq!(out[0].1, TensorDesc::new(DType::BF16, &[3, 3]).unwrap());
    // Ids outside the table are refused on every backend (checked on the host).
    for bad in [[4, 0], [-1, 0]] {
        let h = put_i32(&mut c, &[2], &bad);
        assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::Gather, &[ht, h], &[], &[])))), Status::BadArgument);
        assert_eq!(
            status_of(c.exec(&ExecReq::single(node(ExecOp::Embedding, &[he, h], &[], &[])))),
            Status::BadArgument
        );
    }
    let hf = c.put_f32(&[2], &[0.0, 1.0]).unwrap();
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::Gather, &[ht, hf], &[], &[])))), Status::DTypeMismatch);
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::Gather, &[ht, hids], &[3], &[])))), Status::BadArgument);
    assert_eq!(c.ping(b"ok").unwrap(), b"ok");
}

/// Rotate-half RoPE on the host, in f64.
fn rope_host(x: &[f32], pos: &[i32], inv: &[f32], heads: usize, hd: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    let half = hd / 2;
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..heads {
            let at = (t * heads + h) * hd;
            for i in 0..half {
                let ang = p as f64 * inv[i] as f64;
                let (s, c) = ang.sin_cos();
                let (a, b) = (x[at + i] as f64, x[at + half + i] as f64);
                out[at + i] = (a * c - b * s) as f32;
                out[at + half + i] = (b * c + a * s) as f32;
            }
        }
    }
    out
}

fn rope_theta_and_inv_freq(t: Transport) {
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    let (tokens, heads, hd) = (3usize, 2usize, 8usize);
    let x = vals(tokens * heads * hd, 0.29);
    let pos = [0, 5, 17];
    let hx = c.put_f32(&[3, 2, 8], &x).unwrap();
    let hp = put_i32(&mut c, &[3], &pos);
    let theta = 10000f32;
    let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / theta.powf(2.0 * i as f32 / hd as f32)).collect();
    let (s, v) = run_f32(&mut c, node(ExecOp::Rope, &[hx, hp], &[], &[theta]));
    assert_eq!(s, [3, 2, 8]);
    assert_close(&v, &rope_host(&x, &pos, &inv, heads, hd), 1e-4, "rope theta");
    // Explicit (scaled) frequencies, and the rank-2 form (one head).
    let scaled: Vec<f32> = inv.iter().map(|f| f / 8.0).collect();
    let hf = c.put_f32(&[4], &scaled).unwrap();
    let (_, v) = run_f32(&mut c, node(ExecOp::Rope, &[hx, hp, hf], &[], &[]));
    assert_close(&v, &rope_host(&x, &pos, &scaled, heads, hd), 1e-4, "rope inv_freq");
    let hx2 = c.put_f32(&[3, 16], &x).unwrap();
    let (_, v) = run_f32(&mut c, node(ExecOp::Rope, &[hx2, hp], &[], &[theta]));
    let inv16: Vec<f32> = (0..8).map(|i| 1.0 / theta.powf(2.0 * i as f32 / 16.0)).collect();
    assert_close(&v, &rope_host(&x, &pos, &inv16, 1, 16), 1e-4, "rope rank 2");
    // Refusals: no theta, both theta and frequencies, wrong positions, odd head_dim.
    let bad =
        |c: &mut Client, ins: &[u64], f: &[f32]| status_of(c.exec(&ExecReq::single(node(ExecOp::Rope, ins, &[], f))));
    assert_eq!(bad(&mut c, &[hx, hp], &[]), Status::BadArgument);
    assert_eq!(bad(&mut c, &[hx, hp], &[-1.0]), Status::BadArgument);
    assert_eq!(bad(&mut c, &[hx, hp, hf], &[theta]), Status::BadArgument);
    let hp2 = put_i32(&mut c, &[2], &[0, 1]);
    assert_eq!(bad(&mut c, &[hx, hp2], &[theta]), Status::ShapeMismatch);
    let hpf = c.put_f32(&[3], &[0.0; 3]).unwrap();
    assert_eq!(bad(&mut c, &[hx, hpf], &[theta]), Status::DTypeMismatch);
    let hodd = c.put_f32(&[3, 2, 7], &[0.0; 42]).unwrap();
    assert_eq!(bad(&mut c, &[hodd, hp], &[theta]), Status::ShapeMismatch);
}

fn masked_attention_and_argmax(t: Transport) {
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    // Scores of 2 heads × 3 queries over 5 keys: the queries are positions 2, 3, 4.
    let (h, q, k) = (2usize, 3usize, 5usize);
    let x = vals(h * q * k, 0.41);
    let hx = c.put_f32(&[2, 3, 5], &x).unwrap();
    let masked = |offset: usize| -> Vec<f32> {
        indices(&[h, q, k])
            .iter()
            .map(|i| if i[2] > offset + i[1] { f32::NEG_INFINITY } else { x[offset_of(i, q, k)] })
            .collect()
    };
    fn offset_of(i: &[usize], q: usize, k: usize) -> usize {
        (i[0] * q + i[1]) * k + i[2]
    }
    let (_, v) = run_f32(&mut c, node(ExecOp::CausalMask, &[hx], &[], &[]));
    assert_eq!(v, masked(2), "default offset k - q");
    let (_, v) = run_f32(&mut c, node(ExecOp::CausalMask, &[hx], &[0], &[]));
    assert_eq!(v, masked(0), "offset 0");
    // Mask then softmax in one graph: masked keys get zero weight.
    let req = ExecReq {
        nodes: vec![node(ExecOp::CausalMask, &[hx], &[], &[]), {
            ExecNode::new(ExecOp::Softmax, &[ExecInput::Node(0)])
        }],
        outputs: vec![1],
    };
    let out = c.exec(&req).unwrap();
    let v = c.get_f32(out[0].0).unwrap().1;
    let mut want = Vec::new();
    for row in masked(2).chunks(k) {
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|v| (v - mx).exp()).collect();
        let s: f32 = e.iter().sum();
        want.extend(e.iter().map(|v| v / s));
    }
    assert_close(&v, &want, 1e-5, "masked softmax");
    // bf16 scores are masked in their own dtype.
    let hb = put_bf16(&mut c, &[2, 3, 5], &x);
    let out = c.exec(&ExecReq::single(node(ExecOp::CausalMask, &[hb], &[], &[]))).unwrap();
    let (d, bytes) = c.get(out[0].0).unwrap();
    assert_eq!(d.dtype(), DType::BF16);
    let got: Vec<f32> = bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
    let want: Vec<f32> = masked(2).iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
    assert_eq!(got, want, "bf16 mask");
    // More queries than keys needs an explicit offset; a negative one is refused.
    let tall = c.put_f32(&[5, 3], &[0.0; 15]).unwrap();
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::CausalMask, &[tall], &[], &[])))), Status::ShapeMismatch);
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::CausalMask, &[hx], &[-1], &[])))), Status::BadArgument);

    // Argmax over the last dimension, first maximum wins.
    let logits = [0.5f32, 2.0, 2.0, -1.0, 7.0, 3.0, 7.0, 0.0];
    let hl = c.put_f32(&[2, 4], &logits).unwrap();
    assert_eq!(run_i32(&mut c, node(ExecOp::Argmax, &[hl], &[], &[])), (vec![2], vec![1, 0]));
    let hi = put_i32(&mut c, &[2], &[1, 2]);
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::Argmax, &[hi], &[], &[])))), Status::DTypeMismatch);
}

fn scale_sum_rmsnorm(t: Transport) {
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    let x = vals(12, 0.53);
    let hx = c.put_f32(&[3, 4], &x).unwrap();
    let (_, v) = run_f32(&mut c, node(ExecOp::Scale, &[hx], &[], &[0.25]));
    assert_eq!(v, x.iter().map(|a| a * 0.25).collect::<Vec<_>>(), "scale");
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::Scale, &[hx], &[], &[])))), Status::BadArgument);
    let (s, v) = run_f32(&mut c, node(ExecOp::Sum, &[hx], &[], &[]));
    assert_eq!(s, [3]);
    assert_close(&v, &x.chunks(4).map(|r| r.iter().sum()).collect::<Vec<f32>>(), 1e-5, "sum");
    // RMSNorm with a bf16 weight on f32 activations (the engine's mixed-precision layout).
    let w = [0.5f32, 1.0, 1.5, 2.0];
    let hw = put_bf16(&mut c, &[4], &w);
    let (_, v) = run_f32(&mut c, node(ExecOp::RmsNorm, &[hx, hw], &[], &[1e-6]));
    let mut want = Vec::new();
    for row in x.chunks(4) {
        let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / 4.0;
        let r = 1.0 / (ms + 1e-6).sqrt();
        want.extend(row.iter().zip(&w).map(|(v, g)| v * r * g));
    }
    assert_close(&v, &want, 1e-5, "rmsnorm bf16 weight");
}

fn main() {
    run_trials(vec![
        ("linear_and_matmul", None, linear_and_matmul),
        ("slice_concat_swapdims", None, slice_concat_swapdims),
        ("gather_and_embedding", None, gather_and_embedding),
        ("rope_theta_and_inv_freq", None, rope_theta_and_inv_freq),
        ("masked_attention_and_argmax", None, masked_attention_and_argmax),
        ("scale_sum_rmsnorm", None, scale_sum_rmsnorm),
    ])
}
