//! The semantic-blind baseline: greedy generation against a *stateless* server through the
//! remote tensor ops path, as a GPU-remoting layer that knows nothing of sessions must run it.
//!
//! The weights go up once as remote tensors (`TensorPut`, the cudaMalloc + cudaMemcpy of model
//! load), in the layout and storage dtype the in-process [`djinn_model::Engine`] uses (fused
//! q/k/v and gate/up matrices, the checkpoint's dtype). Then every step:
//! 1. puts the step's token ids and positions and the whole K/V cache of every layer
//!    (`[kv_heads, ctx, head_dim]` f32 each — the server keeps nothing between steps);
//! 2. runs one Exec graph per layer (RMSNorm, projections, RoPE, cache concat, GQA attention as
//!    batched matmuls with a causal mask and softmax, MLP), the first also embedding the tokens
//!    and the last also producing the argmax token;
//! 3. gets every layer's grown K/V cache and the token back, and frees the step's tensors.
//!
//! The first step carries the whole prompt. Generation is greedy and always produces exactly
//! `max_new_tokens` tokens: EOS is not special here (the caller truncates at it if it wants), so
//! runs of the baseline and of a session compare step for step.
//!
//! Numerics follow the engine op for op (same GEMM shapes on the same weight layout, same
//! RMSNorm/residual order, same RoPE and f32 activations), except attention, which is composed
//! from generic ops instead of the engine's fused online-softmax kernel; greedy tokens match the
//! engine's on the reference models (tests/blind_baseline.rs checks it).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use djinn_client::Client;
use djinn_model::checkpoint::{convert_floats, Checkpoint};
use djinn_model::{ModelConfig, WeightLayout};
use djinn_proto::msg::{
    ExecInput, ExecNode, ExecOp, ExecReq, Handle, TensorGetReq, TensorPutReply, TensorPutReq, EXEC_NODES_MAX,
};
use djinn_proto::{DType, Meta, Opcode, TensorDesc};

/// What one baseline run produced and cost.
#[derive(Clone, Debug)]
pub struct BlindRun {
    /// Generated token ids (the prompt excluded), `max_new_tokens` of them.
    pub tokens: Vec<u32>,
    /// Wall time of each step, one per generated token (the first includes the prompt).
    pub step_ms: Vec<f64>,
    /// Bytes this connection sent during generation (after the weight upload).
    pub bytes_sent: u64,
    /// Bytes this connection received during generation (after the weight upload).
    pub bytes_received: u64,
    /// Bytes sent to upload the weights.
    pub upload_bytes: u64,
}

/// Reply bytes the pipelined gets may leave unread at once: below what a TCP socket pair or an
/// shm ring buffers, so the server never blocks on a reply the client is not yet reading.
const GET_WINDOW_BYTES: u64 = 4 << 20;
/// Requests submitted before the oldest is claimed (well under the client's reply buffer).
const PIPELINE_DEPTH_MAX: usize = 32;
/// Headroom under the server's frame limit for the header and metadata of one put.
const FRAME_HEADROOM_BYTES: u64 = 1 << 20;
/// Most inputs of one Concat node (the wire's per-node input limit).
const CONCAT_INPUTS_MAX: usize = 8;

/// Runs greedy generation of `max_new_tokens` tokens after `prompt_ids` on the model in
/// `model_dir` through `client`'s remote tensor ops, freeing every remote tensor it made.
pub fn run(
    client: &mut Client,
    model_dir: &Path,
    prompt_ids: &[u32],
    max_new_tokens: usize,
) -> anyhow::Result<BlindRun> {
    let cfg = ModelConfig::load(model_dir)?;
    let ck = Checkpoint::open(model_dir)?;
    ensure!(!prompt_ids.is_empty(), "the prompt is empty");
    // The last generated token is never fed back, so the cache reaches prompt + new - 1.
    cfg.check_tokens(prompt_ids, max_new_tokens.saturating_sub(1))?;
    let empty = BlindRun { tokens: Vec::new(), step_ms: Vec::new(), bytes_sent: 0, bytes_received: 0, upload_bytes: 0 };
    if max_new_tokens == 0 {
        return Ok(empty);
    }
    let dtype = WeightLayout::choose_dtype(&ck, None)?;
    WeightLayout::validate(&ck, &cfg, dtype)?;

    let mut live = Live::default();
    let result = (|| -> anyhow::Result<BlindRun> {
        let sent0 = client.bytes_sent();
        let weights = upload(client, &ck, &cfg, dtype, &mut live)?;
        let upload_bytes = client.bytes_sent() - sent0;
        let (sent1, recv1) = (client.bytes_sent(), client.bytes_received());
        let mut gen = Generator::new(&cfg, &weights);
        let mut run = BlindRun { upload_bytes, ..empty.clone() };
        let mut next: Vec<u32> = prompt_ids.to_vec();
        while run.tokens.len() < max_new_tokens {
            let t0 = Instant::now();
            let tok = gen.step(client, &next, &mut live)?;
            run.step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            run.tokens.push(tok);
            next = vec![tok];
        }
        run.bytes_sent = client.bytes_sent() - sent1;
        run.bytes_received = client.bytes_received() - recv1;
        Ok(run)
    })();
    let freed = live.free_all(client);
    let run = result?;
    freed.context("freeing the weights")?;
    Ok(run)
}

/// Remote tensors this run holds (freed at the end, also after an error).
#[derive(Default)]
struct Live {
    handles: Vec<Handle>,
}

impl Live {
    fn track(&mut self, h: Handle) -> Handle {
        self.handles.push(h);
        h
    }

    /// Frees `hs` (all tracked) and forgets them.
    fn free(&mut self, client: &mut Client, hs: &[Handle]) -> anyhow::Result<()> {
        if hs.is_empty() {
            return Ok(());
        }
        self.handles.retain(|h| !hs.contains(h));
        for chunk in hs.chunks(djinn_proto::msg::FREE_HANDLES_MAX) {
            client.free(chunk)?;
        }
        Ok(())
    }

    fn free_all(&mut self, client: &mut Client) -> anyhow::Result<()> {
        let hs = std::mem::take(&mut self.handles);
        for chunk in hs.chunks(djinn_proto::msg::FREE_HANDLES_MAX) {
            client.free(chunk)?;
        }
        Ok(())
    }
}

fn wire_dtype(d: djinn_backend::DType) -> anyhow::Result<DType> {
    Ok(match d {
        djinn_backend::DType::F32 => DType::F32,
        djinn_backend::DType::F16 => DType::F16,
        djinn_backend::DType::BF16 => DType::BF16,
        other => bail!("weights stored as {other:?} are not a float type"),
    })
}

fn i32_bytes(xs: impl IntoIterator<Item = i32>) -> Vec<u8> {
    xs.into_iter().flat_map(i32::to_le_bytes).collect()
}

fn desc(dtype: DType, shape: &[usize]) -> anyhow::Result<TensorDesc> {
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    Ok(TensorDesc::new(dtype, &shape)?)
}

/// Puts every `(desc, bytes)` pipelined (submit ahead, claim in order); returns the handles.
fn put_many(client: &mut Client, puts: &[(TensorDesc, &[u8])], live: &mut Live) -> anyhow::Result<Vec<Handle>> {
    let mut ids = std::collections::VecDeque::new();
    let mut out = Vec::with_capacity(puts.len());
    let claim = |client: &mut Client, id: u64, live: &mut Live, out: &mut Vec<Handle>| -> anyhow::Result<()> {
        let r = client.wait(id)?;
        out.push(live.track(TensorPutReply::from_meta(&r.meta)?.handle));
        Ok(())
    };
    for (d, bytes) in puts {
        if ids.len() >= PIPELINE_DEPTH_MAX {
            let id = ids.pop_front().expect("non-empty");
            claim(client, id, live, &mut out)?;
        }
        ids.push_back(client.submit(Opcode::TensorPut, &TensorPutReq { desc: *d }.to_meta(), &[bytes])?);
    }
    while let Some(id) = ids.pop_front() {
        claim(client, id, live, &mut out)?;
    }
    Ok(out)
}

/// Gets every tensor of `hs` (each `expect`ed bytes long) pipelined within [`GET_WINDOW_BYTES`].
fn get_many(client: &mut Client, hs: &[(Handle, u64)]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut ids = std::collections::VecDeque::new();
    let mut window = 0u64;
    let mut out = Vec::with_capacity(hs.len());
    let claim = |client: &mut Client, (id, want): (u64, u64), out: &mut Vec<Vec<u8>>| -> anyhow::Result<u64> {
        let r = client.wait(id)?;
        let d = TensorDesc::from_meta(&r.meta)?;
        ensure!(d.byte_len() == want && r.data.len() as u64 == want, "tensor get: {d:?}, {} bytes", r.data.len());
        out.push(r.data);
        Ok(want)
    };
    for &(h, want) in hs {
        while !ids.is_empty() && (window + want > GET_WINDOW_BYTES || ids.len() >= PIPELINE_DEPTH_MAX) {
            window -= claim(client, ids.pop_front().expect("non-empty"), &mut out)?;
        }
        ids.push_back((client.submit(Opcode::TensorGet, &TensorGetReq { handle: h }.to_meta(), &[])?, want));
        window += want;
    }
    while let Some(x) = ids.pop_front() {
        claim(client, x, &mut out)?;
    }
    Ok(out)
}

/// Uploads one tensor; one larger than a frame goes up in row blocks joined on the server.
fn put_tensor(
    client: &mut Client,
    dtype: DType,
    shape: &[usize],
    bytes: &[u8],
    live: &mut Live,
) -> anyhow::Result<Handle> {
    let d = desc(dtype, shape)?;
    ensure!(d.byte_len() == bytes.len() as u64, "{d:?} needs {} bytes, have {}", d.byte_len(), bytes.len());
    let limit = client.capabilities().frame_bytes_max.saturating_sub(FRAME_HEADROOM_BYTES).max(1);
    if d.byte_len() <= limit {
        return Ok(live.track(client.put(d, bytes)?));
    }
    let rows = shape[0].max(1);
    let row_bytes = bytes.len() / rows;
    let rows_per = (limit / row_bytes.max(1) as u64).max(1) as usize;
    ensure!(row_bytes as u64 <= limit, "one row of {d:?} ({row_bytes} B) exceeds the server's frame limit");
    let mut parts = Vec::new();
    for (i, chunk) in bytes.chunks(rows_per * row_bytes).enumerate() {
        let mut s = shape.to_vec();
        s[0] = chunk.len() / row_bytes;
        parts.push(put_tensor(client, dtype, &s, chunk, live).with_context(|| format!("row block {i} of {d:?}"))?);
    }
    // Join in groups of at most CONCAT_INPUTS_MAX until one tensor is left.
    while parts.len() > 1 {
        let mut joined = Vec::new();
        for group in parts.chunks(CONCAT_INPUTS_MAX) {
            if group.len() == 1 {
                joined.push(group[0]);
                continue;
            }
            let inputs: Vec<ExecInput> = group.iter().map(|&h| ExecInput::Handle(h)).collect();
            let mut n = ExecNode::new(ExecOp::Concat, &inputs);
            n.attrs_i64.push(0);
            let h = client.exec(&ExecReq::single(n))?[0].0;
            joined.push(live.track(h));
            live.free(client, group)?;
        }
        parts = joined;
    }
    Ok(parts[0])
}

/// Remote handles of one layer's weights.
struct LayerHandles {
    ln_in: Handle,
    qkv: Handle,
    qkv_bias: Option<Handle>,
    o: Handle,
    o_bias: Option<Handle>,
    ln_post: Handle,
    gate_up: Handle,
    gate_up_bias: Option<Handle>,
    down: Handle,
    down_bias: Option<Handle>,
}

struct Weights {
    dtype: DType,
    embed: Handle,
    layers: Vec<LayerHandles>,
    norm: Handle,
    lm_head: Handle,
    inv_freq: Handle,
}

/// The checkpoint tensors `sources` (with their shapes) converted to `dtype` and stacked.
fn stacked(ck: &Checkpoint, sources: &[(String, Vec<usize>)], dtype: djinn_backend::DType) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for (name, shape) in sources {
        let e = ck.expect(name, shape)?;
        let (_, src) = ck.data(e);
        let at = out.len();
        out.resize(at + src.len() / e.dtype.size_bytes() * dtype.size_bytes(), 0);
        convert_floats(src, e.dtype, &mut out[at..], dtype);
    }
    Ok(out)
}

fn upload(
    client: &mut Client,
    ck: &Checkpoint,
    cfg: &ModelConfig,
    dtype: djinn_backend::DType,
    live: &mut Live,
) -> anyhow::Result<Weights> {
    let wd = wire_dtype(dtype)?;
    let (h, qd, kvd, inter, v) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size, cfg.vocab_size);
    let name = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
    let mut put =
        |client: &mut Client, shape: &[usize], sources: Vec<(String, Vec<usize>)>| -> anyhow::Result<Handle> {
            let bytes = stacked(ck, &sources, dtype)?;
            put_tensor(client, wd, shape, &bytes, live).with_context(|| format!("uploading {}", sources[0].0))
        };
    let embed = put(client, &[v, h], vec![("model.embed_tokens.weight".into(), vec![v, h])])?;
    let mut layers = Vec::with_capacity(cfg.layers);
    for l in 0..cfg.layers {
        let proj = |what: &str, rows: usize, cols: usize| {
            (name(l, what), if cols == 0 { vec![rows] } else { vec![rows, cols] })
        };
        let ln_in = put(client, &[h], vec![proj("input_layernorm.weight", h, 0)])?;
        let qkv = put(
            client,
            &[qd + 2 * kvd, h],
            vec![
                proj("self_attn.q_proj.weight", qd, h),
                proj("self_attn.k_proj.weight", kvd, h),
                proj("self_attn.v_proj.weight", kvd, h),
            ],
        )?;
        let qkv_bias = if cfg.qkv_bias {
            let s = vec![
                proj("self_attn.q_proj.bias", qd, 0),
                proj("self_attn.k_proj.bias", kvd, 0),
                proj("self_attn.v_proj.bias", kvd, 0),
            ];
            Some(put(client, &[qd + 2 * kvd], s)?)
        } else {
            None
        };
        let o = put(client, &[h, qd], vec![proj("self_attn.o_proj.weight", h, qd)])?;
        let o_bias =
            if cfg.o_bias { Some(put(client, &[h], vec![proj("self_attn.o_proj.bias", h, 0)])?) } else { None };
        let ln_post = put(client, &[h], vec![proj("post_attention_layernorm.weight", h, 0)])?;
        let gate_up = put(
            client,
            &[2 * inter, h],
            vec![proj("mlp.gate_proj.weight", inter, h), proj("mlp.up_proj.weight", inter, h)],
        )?;
        let (gate_up_bias, down_bias) = if cfg.mlp_bias {
            let gu = put(
                client,
                &[2 * inter],
                vec![proj("mlp.gate_proj.bias", inter, 0), proj("mlp.up_proj.bias", inter, 0)],
            )?;
            (Some(gu), Some(put(client, &[h], vec![proj("mlp.down_proj.bias", h, 0)])?))
        } else {
            (None, None)
        };
        let down = put(client, &[h, inter], vec![proj("mlp.down_proj.weight", h, inter)])?;
        layers.push(LayerHandles { ln_in, qkv, qkv_bias, o, o_bias, ln_post, gate_up, gate_up_bias, down, down_bias });
    }
    let norm = put(client, &[h], vec![("model.norm.weight".into(), vec![h])])?;
    let lm_head = if cfg.tie_word_embeddings {
        embed
    } else {
        put(client, &[v, h], vec![("lm_head.weight".into(), vec![v, h])])?
    };
    let inv: Vec<u8> = cfg.inv_freq().iter().flat_map(|f| f.to_le_bytes()).collect();
    let inv_freq = live.track(client.put(desc(DType::F32, &[cfg.head_dim / 2])?, &inv)?);
    Ok(Weights { dtype: wd, embed, layers, norm, lm_head, inv_freq })
}

/// An Exec graph under construction.
struct Graph {
    nodes: Vec<ExecNode>,
}

impl Graph {
    fn add(&mut self, op: ExecOp, inputs: &[ExecInput], i64s: &[i64], f32s: &[f32]) -> ExecInput {
        let mut n = ExecNode::new(op, inputs);
        n.attrs_i64.extend_from_slice(i64s);
        n.attrs_f32.extend_from_slice(f32s);
        self.nodes.push(n);
        ExecInput::Node((self.nodes.len() - 1) as u16)
    }

    fn reshape(&mut self, x: ExecInput, shape: &[usize]) -> ExecInput {
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        self.add(ExecOp::Reshape, &[x], &s, &[])
    }

    /// `x · w[start..start + n]ᵀ (+ bias)`; the whole weight when `window` is `None`.
    fn linear(&mut self, x: ExecInput, w: Handle, bias: Option<Handle>, window: Option<(usize, usize)>) -> ExecInput {
        let mut ins = vec![x, ExecInput::Handle(w)];
        ins.extend(bias.map(ExecInput::Handle));
        let attrs: Vec<i64> = window.map(|(s, n)| vec![s as i64, n as i64]).unwrap_or_default();
        self.add(ExecOp::Linear, &ins, &attrs, &[])
    }

    /// Row blocks `sizes` of the fused weight `w` applied to `x` (`t` rows), as the engine does:
    /// one product over the whole fused matrix then slices for a single row, one product per
    /// block for several.
    fn split_linear(
        &mut self,
        x: ExecInput,
        t: usize,
        w: Handle,
        bias: Option<Handle>,
        sizes: &[usize],
    ) -> Vec<ExecInput> {
        let mut out = Vec::with_capacity(sizes.len());
        let mut at = 0;
        if t == 1 {
            let all = self.linear(x, w, bias, None);
            for &n in sizes {
                out.push(self.add(ExecOp::Slice, &[all], &[-1, at as i64, n as i64], &[]));
                at += n;
            }
        } else {
            for &n in sizes {
                out.push(self.linear(x, w, bias, Some((at, n))));
                at += n;
            }
        }
        out
    }

    fn into_req(self, outputs: &[ExecInput]) -> anyhow::Result<ExecReq> {
        ensure!(
            self.nodes.len() <= EXEC_NODES_MAX,
            "a layer graph of {} nodes exceeds the wire limit",
            self.nodes.len()
        );
        let outputs = outputs
            .iter()
            .map(|o| match *o {
                ExecInput::Node(j) => Ok(j),
                ExecInput::Handle(_) => bail!("a graph output must be a node"),
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(ExecReq { nodes: self.nodes, outputs })
    }
}

/// The client-side state of a stateless generation: the K/V cache of every layer lives here
/// between steps, as `[kv_heads, ctx, head_dim]` f32 bytes.
struct Generator<'a> {
    cfg: &'a ModelConfig,
    w: &'a Weights,
    kv: Vec<(Vec<u8>, Vec<u8>)>,
    ctx: usize,
}

impl<'a> Generator<'a> {
    fn new(cfg: &'a ModelConfig, w: &'a Weights) -> Self {
        Generator { cfg, w, kv: vec![(Vec::new(), Vec::new()); cfg.layers], ctx: 0 }
    }

    /// Feeds `tokens` at the next positions; returns the greedy next token.
    fn step(&mut self, client: &mut Client, tokens: &[u32], live: &mut Live) -> anyhow::Result<u32> {
        let c = self.cfg;
        let (t, start) = (tokens.len(), self.ctx);
        let (kvh, hd) = (c.kv_heads, c.head_dim);
        let ids = i32_bytes(tokens.iter().map(|&x| x as i32));
        let pos = i32_bytes((start..start + t).map(|p| p as i32));
        let mut puts: Vec<(TensorDesc, &[u8])> = vec![(desc(DType::I32, &[t])?, &ids), (desc(DType::I32, &[t])?, &pos)];
        let cache_desc = desc(DType::F32, &[kvh, start, hd])?;
        if start > 0 {
            for (k, v) in &self.kv {
                puts.push((cache_desc, k));
                puts.push((cache_desc, v));
            }
        }
        let step_handles = put_many(client, &puts, live)?;
        let (h_ids, h_pos) = (step_handles[0], step_handles[1]);
        let mut made = step_handles.clone();

        let mut resid: Option<Handle> = None;
        let mut fetch = Vec::with_capacity(2 * c.layers + 1);
        let new_cache_bytes = desc(DType::F32, &[kvh, start + t, hd])?.byte_len();
        for l in 0..c.layers {
            let old = (start > 0).then(|| (step_handles[2 + 2 * l], step_handles[3 + 2 * l]));
            let last = l + 1 == c.layers;
            let req = self.layer_graph(l, t, start, resid, h_ids, h_pos, old, last)?;
            let outs = client.exec(&req).with_context(|| format!("layer {l}"))?;
            let hs: Vec<Handle> = outs.iter().map(|o| live.track(o.0)).collect();
            made.extend_from_slice(&hs);
            fetch.push((hs[1], new_cache_bytes));
            fetch.push((hs[2], new_cache_bytes));
            if last {
                fetch.push((hs[0], 4));
            } else {
                resid = Some(hs[0]);
            }
        }
        let mut got = get_many(client, &fetch)?;
        let tok = got.pop().expect("the token was fetched");
        let tok = i32::from_le_bytes(tok[..4].try_into()?);
        for (l, kv) in got.chunks_exact_mut(2).enumerate() {
            self.kv[l] = (std::mem::take(&mut kv[0]), std::mem::take(&mut kv[1]));
        }
        self.ctx += t;
        live.free(client, &made)?;
        ensure!(tok >= 0 && (tok as usize) < c.vocab_size, "argmax {tok} outside the vocabulary");
        Ok(tok as u32)
    }

    /// Layer `l`'s graph for `t` new tokens after `start` cached positions. Outputs the next
    /// residual (or, for the last layer, the argmax token) and the layer's grown K and V.
    #[allow(clippy::too_many_arguments)]
    fn layer_graph(
        &self,
        l: usize,
        t: usize,
        start: usize,
        resid: Option<Handle>,
        ids: Handle,
        pos: Handle,
        old_kv: Option<(Handle, Handle)>,
        last: bool,
    ) -> anyhow::Result<ExecReq> {
        let c = self.cfg;
        let lw = &self.w.layers[l];
        let (heads, kvh, hd) = (c.heads, c.kv_heads, c.head_dim);
        let (qd, kvd, inter, group, ctx) = (c.q_dim(), c.kv_dim(), c.intermediate_size, heads / kvh, start + t);
        let eps = [c.rms_norm_eps];
        let (pos, inv) = (ExecInput::Handle(pos), ExecInput::Handle(self.w.inv_freq));
        let mut g = Graph { nodes: Vec::new() };
        let h = match resid {
            Some(r) => ExecInput::Handle(r),
            None => {
                let e = g.add(ExecOp::Embedding, &[ExecInput::Handle(self.w.embed), ExecInput::Handle(ids)], &[], &[]);
                // The residual stream is f32 whatever the weights' dtype (as in the engine).
                if self.w.dtype == DType::F32 {
                    e
                } else {
                    g.add(ExecOp::Cast, &[e], &[DType::F32 as i64], &[])
                }
            }
        };
        let xn = g.add(ExecOp::RmsNorm, &[h, ExecInput::Handle(lw.ln_in)], &[], &eps);
        let qkv = g.split_linear(xn, t, lw.qkv, lw.qkv_bias, &[qd, kvd, kvd]);
        let q = g.reshape(qkv[0], &[t, heads, hd]);
        let q = g.add(ExecOp::Rope, &[q, pos, inv], &[], &[]);
        let k = g.reshape(qkv[1], &[t, kvh, hd]);
        let k = g.add(ExecOp::Rope, &[k, pos, inv], &[], &[]);
        let v = g.reshape(qkv[2], &[t, kvh, hd]);
        // This step's K/V as [kv_heads, t, head_dim], appended to the cache along positions.
        let k = g.add(ExecOp::SwapDims, &[k], &[0, 1], &[]);
        let v = g.add(ExecOp::SwapDims, &[v], &[0, 1], &[]);
        let (kc, vc) = match old_kv {
            Some((ko, vo)) => (
                g.add(ExecOp::Concat, &[ExecInput::Handle(ko), k], &[1], &[]),
                g.add(ExecOp::Concat, &[ExecInput::Handle(vo), v], &[1], &[]),
            ),
            None => (k, v),
        };
        // GQA without repeating K/V: the query heads sharing a KV head are stacked as rows, so
        // each KV head is one batch entry: [kv_heads, group · t, head_dim] × [kv_heads, ctx, head_dim]ᵀ.
        let qs = g.add(ExecOp::Scale, &[q], &[], &[1.0 / (hd as f32).sqrt()]);
        let qs = g.add(ExecOp::SwapDims, &[qs], &[0, 1], &[]);
        let qs = g.reshape(qs, &[kvh, group * t, hd]);
        let scores = g.add(ExecOp::MatMul, &[qs, kc], &[1], &[]);
        let scores = g.reshape(scores, &[kvh, group, t, ctx]);
        let scores = g.add(ExecOp::CausalMask, &[scores], &[start as i64], &[]);
        let p = g.add(ExecOp::Softmax, &[scores], &[], &[]);
        let p = g.reshape(p, &[kvh, group * t, ctx]);
        let a = g.add(ExecOp::MatMul, &[p, vc], &[], &[]);
        let a = g.reshape(a, &[heads, t, hd]);
        let a = g.add(ExecOp::SwapDims, &[a], &[0, 1], &[]);
        let a = g.reshape(a, &[t, qd]);
        let o = g.linear(a, lw.o, lw.o_bias, None);
        let h = g.add(ExecOp::Add, &[h, o], &[], &[]);
        let xn = g.add(ExecOp::RmsNorm, &[h, ExecInput::Handle(lw.ln_post)], &[], &eps);
        let gu = g.split_linear(xn, t, lw.gate_up, lw.gate_up_bias, &[inter, inter]);
        let act = g.add(ExecOp::SiluMul, &[gu[0], gu[1]], &[], &[]);
        let d = g.linear(act, lw.down, lw.down_bias, None);
        let h = g.add(ExecOp::Add, &[h, d], &[], &[]);
        let first = if last {
            let x = g.add(ExecOp::RmsNorm, &[h, ExecInput::Handle(self.w.norm)], &[], &eps);
            let x = if t > 1 { g.add(ExecOp::Slice, &[x], &[0, t as i64 - 1, 1], &[]) } else { x };
            let logits = g.linear(x, self.w.lm_head, None, None);
            g.add(ExecOp::Argmax, &[logits], &[], &[])
        } else {
            h
        };
        g.into_req(&[first, kc, vc])
    }
}
