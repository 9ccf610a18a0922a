//! Request and reply messages: what the metadata of each opcode holds.
//!
//! # Layout
//! All integers little-endian. `str`/`bytes` = `u32` length + bytes (UTF-8 for `str`);
//! `[T]` = `u32` count + elements. `desc` = the 80-byte `TensorDescWire`. Counts and string lengths
//! have per-field limits (constants below) checked before anything is allocated.
//!
//! | opcode | request meta / data | reply meta / data |
//! |---|---|---|
//! | Hello | `HelloReq`: u16 version_min, u16 version_max, bytes token, str client_name | `HelloReply`: u16 version, u64 tenant_id, u64 frame_bytes_max, u32 meta_bytes_max, str backend, [device: str name, u64 memory_bytes], [str model], [str transport] |
//! | Ping | empty / any bytes | empty / the same bytes |
//! | Stats | empty | `StatsReply`: [str name, u64 value] |
//! | TensorPut | `TensorPutReq`: desc / the tensor's bytes (`data_len == desc.byte_len`) | `TensorPutReply`: u64 handle |
//! | TensorGet | `TensorGetReq`: u64 handle | desc / the tensor's bytes |
//! | TensorFree | `TensorFreeReq`: [u64 handle] | empty |
//! | Exec | `ExecReq`: [node], [u16 output node index] | `ExecReply`: [u64 handle, desc] (one per output, in order) |
//!
//! An Exec node is `u16 op, u8 n_inputs, u8 n_f32, u8 n_i64, 3 reserved` followed by `n_inputs`
//! `ExecInputWire` (u8 kind 0 = handle / 1 = earlier node, 7 reserved, u64 value), `n_f32` f32 attrs
//! and `n_i64` i64 attrs. A node may only name earlier nodes, so a graph is acyclic by construction.
//!
//! A failed reply (`FLAG_REPLY`, `status != 0`) has metadata = UTF-8 message and no data
//! ([`ErrorReply`]).

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::meta::{Meta, MetaError, MetaReader, MetaWriter};
use crate::tensor::{TensorDesc, TENSOR_DESC_WIRE_LEN};

/// A server-side tensor, valid only for the tenant that created it.
pub type Handle = u64;

/// Longest authentication token accepted in a Hello.
pub const TOKEN_BYTES_MAX: usize = 4096;
/// Longest name (client, backend, device, model, transport, stat).
pub const NAME_BYTES_MAX: usize = 256;
/// Most devices, models or transports in a capabilities reply.
pub const CAPS_LIST_MAX: usize = 256;
/// Most counters in a Stats reply.
pub const STATS_MAX: usize = 1024;
/// Most handles freed by one TensorFree.
pub const FREE_HANDLES_MAX: usize = 4096;
/// Most nodes in one Exec graph.
pub const EXEC_NODES_MAX: usize = 256;
/// Most inputs of one Exec node.
pub const EXEC_INPUTS_MAX: usize = 8;
/// Most f32 and most i64 attributes of one Exec node.
pub const EXEC_ATTRS_MAX: usize = 8;

// ---------------------------------------------------------------------------------------------
// Handshake

/// Client → server, first frame on every connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReq {
    pub version_min: u16,
    pub version_max: u16,
    /// May be empty (server without an auth file).
    pub token: Vec<u8>,
    pub client_name: String,
}

impl Meta for HelloReq {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u16(self.version_min);
        w.put_u16(self.version_max);
        w.put_bytes(&self.token);
        w.put_str(&self.client_name);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        let version_min = r.get_u16("version_min")?;
        let version_max = r.get_u16("version_max")?;
        if version_min > version_max {
            return Err(MetaError::BadValue { what: "version_min > version_max", value: version_min as u64 });
        }
        Ok(HelloReq {
            version_min,
            version_max,
            token: r.get_bytes("token", TOKEN_BYTES_MAX)?.to_vec(),
            client_name: r.get_str("client_name", NAME_BYTES_MAX)?.to_owned(),
        })
    }
}

impl HelloReq {
    /// Highest version both sides speak, if any.
    pub fn negotiate(&self, server_min: u16, server_max: u16) -> Option<u16> {
        let v = self.version_max.min(server_max);
        (v >= self.version_min.max(server_min)).then_some(v)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub memory_bytes: u64,
}

/// Server → client: the chosen version and what the server offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    pub version: u16,
    pub tenant_id: u64,
    pub frame_bytes_max: u64,
    pub meta_bytes_max: u32,
    /// Backend kind: "cpu", "cuda".
    pub backend: String,
    pub devices: Vec<DeviceInfo>,
    pub models: Vec<String>,
    /// URL schemes the server listens on: "tcp", "shm".
    pub transports: Vec<String>,
}

impl Meta for HelloReply {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u16(self.version);
        w.put_u64(self.tenant_id);
        w.put_u64(self.frame_bytes_max);
        w.put_u32(self.meta_bytes_max);
        w.put_str(&self.backend);
        w.put_count(self.devices.len());
        for d in &self.devices {
            w.put_str(&d.name);
            w.put_u64(d.memory_bytes);
        }
        w.put_count(self.models.len());
        for m in &self.models {
            w.put_str(m);
        }
        w.put_count(self.transports.len());
        for t in &self.transports {
            w.put_str(t);
        }
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        let version = r.get_u16("version")?;
        let tenant_id = r.get_u64("tenant_id")?;
        let frame_bytes_max = r.get_u64("frame_bytes_max")?;
        let meta_bytes_max = r.get_u32("meta_bytes_max")?;
        let backend = r.get_str("backend", NAME_BYTES_MAX)?.to_owned();
        // A device is at least a 4-byte name length + 8-byte memory size.
        let n = r.get_count("devices", 12, CAPS_LIST_MAX)?;
        let mut devices = Vec::with_capacity(n);
        for _ in 0..n {
            let name = r.get_str("device name", NAME_BYTES_MAX)?.to_owned();
            devices.push(DeviceInfo { name, memory_bytes: r.get_u64("device memory")? });
        }
        let models = r.get_str_list("models", CAPS_LIST_MAX, NAME_BYTES_MAX)?;
        let transports = r.get_str_list("transports", CAPS_LIST_MAX, NAME_BYTES_MAX)?;
        Ok(HelloReply { version, tenant_id, frame_bytes_max, meta_bytes_max, backend, devices, models, transports })
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and stats

/// Metadata of a failed reply: a human-readable message. The code is in the header's `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    pub message: String,
}

impl ErrorReply {
    /// Longest message a server sends; longer ones are cut at a char boundary.
    pub const MESSAGE_BYTES_MAX: usize = 1024;

    pub fn new(message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > Self::MESSAGE_BYTES_MAX {
            let mut cut = Self::MESSAGE_BYTES_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        ErrorReply { message }
    }

    /// The metadata bytes (the raw message, no length prefix: the header's meta_len is the length).
    pub fn encode_bytes(&self) -> &[u8] {
        self.message.as_bytes()
    }

    /// Decodes an error reply's metadata; invalid UTF-8 is replaced rather than rejected, because
    /// the status code already says what failed.
    pub fn decode_bytes(meta: &[u8]) -> Self {
        ErrorReply { message: String::from_utf8_lossy(meta).into_owned() }
    }
}

/// Reply to `Stats`: named counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsReply {
    pub counters: Vec<(String, u64)>,
}

impl Meta for StatsReply {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_count(self.counters.len());
        for (k, v) in &self.counters {
            w.put_str(k);
            w.put_u64(*v);
        }
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        let n = r.get_count("stats", 12, STATS_MAX)?;
        let mut counters = Vec::with_capacity(n);
        for _ in 0..n {
            let k = r.get_str("stat name", NAME_BYTES_MAX)?.to_owned();
            counters.push((k, r.get_u64("stat value")?));
        }
        Ok(StatsReply { counters })
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorPutReq {
    pub desc: TensorDesc,
}

impl Meta for TensorPutReq {
    fn encode(&self, w: &mut MetaWriter) {
        self.desc.encode(w);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(TensorPutReq { desc: TensorDesc::decode(r)? })
    }
}

macro_rules! handle_msg {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name {
            pub handle: Handle,
        }
        impl Meta for $name {
            fn encode(&self, w: &mut MetaWriter) {
                w.put_u64(self.handle);
            }
            fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
                Ok($name { handle: r.get_u64("handle")? })
            }
        }
    };
}

handle_msg!(
    /// Reply to TensorPut: the new tensor's handle.
    TensorPutReply
);
handle_msg!(
    /// Request of TensorGet; the reply's meta is the tensor's `TensorDesc`, its data the bytes.
    TensorGetReq
);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorFreeReq {
    pub handles: Vec<Handle>,
}

impl Meta for TensorFreeReq {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_count(self.handles.len());
        for h in &self.handles {
            w.put_u64(*h);
        }
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        let n = r.get_count("handles", 8, FREE_HANDLES_MAX)?;
        let mut handles = Vec::with_capacity(n);
        for _ in 0..n {
            handles.push(r.get_u64("handle")?);
        }
        Ok(TensorFreeReq { handles })
    }
}

// ---------------------------------------------------------------------------------------------
// Exec

crate::codes::wire_enum! {
    /// Operations an Exec node runs. Numbers are wire format: append only. Attribute meaning per op
    /// is documented on the variant; a backend answers `Status::Unsupported` for ops it lacks.
    ExecOp: "exec op" {
        /// `[.., m, k] × [.., k, n]` (batch dims equal, or `b` one shared matrix). Optional i64
        /// attr 0 = 1: `b` is `[.., n, k]` (multiply by its transpose). `b` may be another float
        /// dtype than `a`; the output has `a`'s.
        MatMul = 1,
        Add = 2,
        Mul = 3,
        Sub = 4,
        Div = 5,
        /// Over the last dimension.
        Softmax = 6,
        /// Over the last dimension; inputs `[x, weight]` (weight may be another float dtype),
        /// f32 attr 0 = eps.
        RmsNorm = 7,
        Silu = 8,
        /// `silu(a) * b`.
        SiluMul = 9,
        Exp = 10,
        Neg = 11,
        /// Not served yet (`Unsupported`).
        Gelu = 12,
        Sqrt = 13,
        /// `x * f32 attr 0`.
        Scale = 14,
        /// Swaps the last two dimensions (no attrs; `SwapDims` names any two); the result is
        /// contiguous.
        Transpose = 15,
        /// i64 attrs = the new shape.
        Reshape = 16,
        /// Sum over the last dimension.
        Sum = 17,
        /// i64 attr 0 = target dtype code.
        Cast = 18,
        /// Rotate-half rotary embedding of `x` = `[tokens, head_dim]` or `[.., heads, head_dim]`
        /// at i32 `positions` (one per token: the shape of `x` without its last one or two
        /// dims). Inputs `[x, positions]` with f32 attr 0 = theta (default frequencies), or
        /// `[x, positions, inv_freq]` with f32 `inv_freq` `[head_dim / 2]` (any scaling folded in).
        Rope = 19,
        /// Rows of a `[rows, width]` table; inputs `[table, i32 ids]`; out `[.. ids, width]`.
        Embedding = 20,
        /// Copy of the input (keeps a node's output under a new handle).
        Copy = 21,
        /// `x[.., k] · w[start..start + n, k]ᵀ (+ bias[start..start + n])`: a projection by a
        /// window of rows of a `[rows, k]` weight, which may be another float dtype than `x`.
        /// Inputs `[x, w]` or `[x, w, bias]`; i64 attrs none (every row) or `[start, n]`.
        Linear = 22,
        /// i64 attrs `[dim, start, len]` (`dim` < 0 counts from the end): `x[.., start..start + len, ..]`.
        Slice = 23,
        /// 2 to 8 inputs of one dtype, equal shapes but for dimension i64 attr 0 (`dim`, < 0
        /// counts from the end), joined along it in input order.
        Concat = 24,
        /// Swaps two dimensions, i64 attrs `[dim0, dim1]` (< 0 counts from the end); the
        /// result is contiguous.
        SwapDims = 25,
        /// `x[.., q, k]` with `-inf` where key `j > offset + i` for query row `i` (causal
        /// attention scores); optional i64 attr 0 = `offset` ≥ 0 (default `k - q`: the queries
        /// are the last `q` of `k` positions).
        CausalMask = 26,
        /// Index of the first maximum over the last dimension: i32 `x.shape[..rank - 1]`.
        Argmax = 27,
        /// Index-select: inputs `[table, i32 ids]`, optional i64 attr 0 = `dim` (default 0, < 0
        /// counts from the end); out = `table.shape[..dim] ++ ids.shape ++ table.shape[dim + 1..]`.
        /// Ids outside `0..table.shape[dim]` are `BadArgument`.
        Gather = 28,
    }
}

/// Where a node input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecInput {
    /// An existing tensor of this tenant.
    Handle(Handle),
    /// The output of an earlier node of the same graph.
    Node(u16),
}

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct ExecNodeWire {
    op: U16,
    n_inputs: u8,
    n_f32: u8,
    n_i64: u8,
    reserved: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct ExecInputWire {
    kind: u8,
    reserved: [u8; 7],
    value: U64,
}

const EXEC_INPUT_HANDLE: u8 = 0;
const EXEC_INPUT_NODE: u8 = 1;
const EXEC_NODE_WIRE_LEN: usize = core::mem::size_of::<ExecNodeWire>();

#[derive(Clone, Debug, PartialEq)]
pub struct ExecNode {
    pub op: ExecOp,
    pub inputs: Vec<ExecInput>,
    pub attrs_f32: Vec<f32>,
    pub attrs_i64: Vec<i64>,
}

impl ExecNode {
    pub fn new(op: ExecOp, inputs: &[ExecInput]) -> Self {
        ExecNode { op, inputs: inputs.to_vec(), attrs_f32: Vec::new(), attrs_i64: Vec::new() }
    }
}

/// A small acyclic graph of ops; `outputs` names the nodes whose results become new handles.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecReq {
    pub nodes: Vec<ExecNode>,
    pub outputs: Vec<u16>,
}

impl ExecReq {
    /// One op whose result is kept.
    pub fn single(node: ExecNode) -> Self {
        ExecReq { nodes: vec![node], outputs: vec![0] }
    }
}

fn small_count(n: usize) -> u8 {
    u8::try_from(n).expect("exec node list longer than 255")
}

impl Meta for ExecReq {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_count(self.nodes.len());
        for n in &self.nodes {
            w.put_struct(&ExecNodeWire {
                op: n.op.as_u16().into(),
                n_inputs: small_count(n.inputs.len()),
                n_f32: small_count(n.attrs_f32.len()),
                n_i64: small_count(n.attrs_i64.len()),
                reserved: [0; 3],
            });
            for i in &n.inputs {
                let (kind, value) = match *i {
                    ExecInput::Handle(h) => (EXEC_INPUT_HANDLE, h),
                    ExecInput::Node(j) => (EXEC_INPUT_NODE, j as u64),
                };
                w.put_struct(&ExecInputWire { kind, reserved: [0; 7], value: value.into() });
            }
            for &a in &n.attrs_f32 {
                w.put_f32(a);
            }
            for &a in &n.attrs_i64 {
                w.put_i64(a);
            }
        }
        w.put_count(self.outputs.len());
        for &o in &self.outputs {
            w.put_u16(o);
        }
    }

    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        let n_nodes = r.get_count("exec nodes", EXEC_NODE_WIRE_LEN, EXEC_NODES_MAX)?;
        let mut nodes = Vec::with_capacity(n_nodes);
        for index in 0..n_nodes {
            let wire: ExecNodeWire = r.get_struct("exec node")?;
            let op = ExecOp::try_from(wire.op.get())
                .map_err(|e| MetaError::BadValue { what: "exec op", value: e.value as u64 })?;
            for (count, what) in [(wire.n_inputs, "exec inputs"), (wire.n_f32, "f32 attrs"), (wire.n_i64, "i64 attrs")]
            {
                let max = if what == "exec inputs" { EXEC_INPUTS_MAX } else { EXEC_ATTRS_MAX };
                if count as usize > max {
                    return Err(MetaError::TooMany { what, count: count as u64, max: max as u64 });
                }
            }
            let mut inputs = Vec::with_capacity(wire.n_inputs as usize);
            for _ in 0..wire.n_inputs {
                let i: ExecInputWire = r.get_struct("exec input")?;
                inputs.push(match i.kind {
                    EXEC_INPUT_HANDLE => ExecInput::Handle(i.value.get()),
                    EXEC_INPUT_NODE if i.value.get() < index as u64 => ExecInput::Node(i.value.get() as u16),
                    EXEC_INPUT_NODE => {
                        return Err(MetaError::BadValue { what: "exec input node", value: i.value.get() })
                    }
                    k => return Err(MetaError::BadValue { what: "exec input kind", value: k as u64 }),
                });
            }
            let mut attrs_f32 = Vec::with_capacity(wire.n_f32 as usize);
            for _ in 0..wire.n_f32 {
                attrs_f32.push(r.get_f32("f32 attr")?);
            }
            let mut attrs_i64 = Vec::with_capacity(wire.n_i64 as usize);
            for _ in 0..wire.n_i64 {
                attrs_i64.push(r.get_i64("i64 attr")?);
            }
            nodes.push(ExecNode { op, inputs, attrs_f32, attrs_i64 });
        }
        let n_out = r.get_count("exec outputs", 2, EXEC_NODES_MAX)?;
        let mut outputs = Vec::with_capacity(n_out);
        for _ in 0..n_out {
            let o = r.get_u16("exec output")?;
            if o as usize >= n_nodes {
                return Err(MetaError::BadValue { what: "exec output node", value: o as u64 });
            }
            outputs.push(o);
        }
        Ok(ExecReq { nodes, outputs })
    }
}

/// Reply to Exec: one new handle per requested output, in request order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecReply {
    pub outputs: Vec<(Handle, TensorDesc)>,
}

impl Meta for ExecReply {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_count(self.outputs.len());
        for (h, d) in &self.outputs {
            w.put_u64(*h);
            d.encode(w);
        }
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        let n = r.get_count("exec outputs", 8 + TENSOR_DESC_WIRE_LEN, EXEC_NODES_MAX)?;
        let mut outputs = Vec::with_capacity(n);
        for _ in 0..n {
            let h = r.get_u64("output handle")?;
            outputs.push((h, TensorDesc::decode(r)?));
        }
        Ok(ExecReply { outputs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    use crate::meta::assert_round_trip as round_trip;

    fn sample_exec() -> ExecReq {
        let mut norm = ExecNode::new(ExecOp::RmsNorm, &[ExecInput::Node(0), ExecInput::Handle(9)]);
        norm.attrs_f32.push(1e-5);
        let mut reshape = ExecNode::new(ExecOp::Reshape, &[ExecInput::Node(1)]);
        reshape.attrs_i64.extend([2, -1]);
        ExecReq {
            nodes: vec![ExecNode::new(ExecOp::MatMul, &[ExecInput::Handle(7), ExecInput::Handle(8)]), norm, reshape],
            outputs: vec![2, 0],
        }
    }

    #[test]
    fn messages_round_trip() {
        round_trip(&HelloReq { version_min: 1, version_max: 3, token: b"s3cret".to_vec(), client_name: "cli".into() });
        round_trip(&HelloReq { version_min: 1, version_max: 1, token: vec![], client_name: String::new() });
        round_trip(&HelloReply {
            version: 1,
            tenant_id: 42,
            frame_bytes_max: 1 << 26,
            meta_bytes_max: 65536,
            backend: "cpu".into(),
            devices: vec![DeviceInfo { name: "cpu0".into(), memory_bytes: 24 << 30 }],
            models: vec!["tiny".into(), "llama".into()],
            transports: vec!["tcp".into(), "shm".into()],
        });
        round_trip(&StatsReply { counters: vec![("requests".into(), 5), ("bytes_in".into(), 1 << 40)] });
        round_trip(&TensorPutReq { desc: TensorDesc::new(DType::BF16, &[2, 3]).unwrap() });
        round_trip(&TensorPutReply { handle: 77 });
        round_trip(&TensorGetReq { handle: u64::MAX });
        round_trip(&TensorFreeReq { handles: vec![1, 2, 3] });
        round_trip(&sample_exec());
        round_trip(&ExecReply {
            outputs: vec![
                (1, TensorDesc::new(DType::F32, &[4]).unwrap()),
                (2, TensorDesc::new(DType::I64, &[]).unwrap()),
            ],
        });
    }

    #[test]
    fn every_exec_op_round_trips_with_attrs() {
        // Wire numbers are append-only: the ops a Llama step needs keep theirs.
        let pinned = [
            (ExecOp::Linear, 22),
            (ExecOp::Slice, 23),
            (ExecOp::Concat, 24),
            (ExecOp::SwapDims, 25),
            (ExecOp::CausalMask, 26),
            (ExecOp::Argmax, 27),
            (ExecOp::Gather, 28),
        ];
        for (op, n) in pinned {
            assert_eq!(op.as_u16(), n, "{}", op.name());
        }
        let nodes = ExecOp::ALL
            .iter()
            .enumerate()
            .map(|(i, &op)| {
                let mut n = ExecNode::new(op, &[ExecInput::Handle(i as u64 + 1); EXEC_INPUTS_MAX]);
                n.attrs_i64 = vec![-1, i as i64, i64::MAX];
                n.attrs_f32 = vec![0.5; EXEC_ATTRS_MAX];
                n
            })
            .collect();
        round_trip(&ExecReq { nodes, outputs: vec![0, ExecOp::ALL.len() as u16 - 1] });
    }

    #[test]
    fn exec_rejections() {
        // A node naming itself or a later node.
        let mut bad = sample_exec();
        bad.nodes[1].inputs[0] = ExecInput::Node(1);
        assert!(matches!(ExecReq::from_meta(&bad.to_meta()), Err(MetaError::BadValue { .. })));
        // An output index past the graph.
        let mut bad = sample_exec();
        bad.outputs.push(3);
        assert!(matches!(ExecReq::from_meta(&bad.to_meta()), Err(MetaError::BadValue { .. })));
        // Too many inputs.
        let mut bad = sample_exec();
        bad.nodes[0].inputs = vec![ExecInput::Handle(1); EXEC_INPUTS_MAX + 1];
        assert!(matches!(ExecReq::from_meta(&bad.to_meta()), Err(MetaError::TooMany { .. })));
        // Unknown op code.
        let mut b = sample_exec().to_meta();
        b[4..6].copy_from_slice(&999u16.to_le_bytes());
        assert!(matches!(ExecReq::from_meta(&b), Err(MetaError::BadValue { what: "exec op", value: 999 })));
        // Unknown input kind.
        let mut b = sample_exec().to_meta();
        b[4 + EXEC_NODE_WIRE_LEN] = 7;
        assert!(matches!(ExecReq::from_meta(&b), Err(MetaError::BadValue { what: "exec input kind", .. })));
        // Node count that cannot fit in the bytes left.
        let mut b = sample_exec().to_meta();
        b[0..4].copy_from_slice(&200u32.to_le_bytes());
        assert!(ExecReq::from_meta(&b).is_err());
    }

    #[test]
    fn hello_rejections_and_negotiation() {
        let h = HelloReq { version_min: 2, version_max: 1, token: vec![], client_name: "x".into() };
        assert!(matches!(HelloReq::from_meta(&h.to_meta()), Err(MetaError::BadValue { .. })));
        let h =
            HelloReq { version_min: 1, version_max: 3, token: vec![0; TOKEN_BYTES_MAX + 1], client_name: "".into() };
        assert!(matches!(HelloReq::from_meta(&h.to_meta()), Err(MetaError::TooMany { .. })));
        let h = HelloReq { version_min: 1, version_max: 3, token: vec![], client_name: "".into() };
        assert_eq!(h.negotiate(1, 1), Some(1));
        assert_eq!(h.negotiate(2, 5), Some(3));
        assert_eq!(h.negotiate(4, 5), None);
    }

    #[test]
    fn error_reply_truncates_on_char_boundary() {
        let e = ErrorReply::new("é".repeat(1000));
        assert!(e.message.len() <= ErrorReply::MESSAGE_BYTES_MAX);
        assert_eq!(ErrorReply::decode_bytes(e.encode_bytes()), e);
        assert_eq!(ErrorReply::decode_bytes(&[0xff]).message, "\u{fffd}");
    }
}
