//! Writes the seed corpus for `frame_decoder`: a valid frame (header + metadata) of every message,
//! encoded by the real encoders. Usage: `cargo run --bin seed_corpus -- corpus/frame_decoder`.

use djinn_proto::*;

fn frame(op: Opcode, flags: u16, meta: Vec<u8>) -> Vec<u8> {
    let h = FrameHeader::new(op.as_u16(), flags, 1, meta.len() as u32, 0);
    let mut v = zerocopy::IntoBytes::as_bytes(&h).to_vec();
    v.extend(meta);
    v
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: seed_corpus DIR");
    let desc = TensorDesc::new(DType::F32, &[2, 3]).unwrap();
    let mut norm = ExecNode::new(ExecOp::RmsNorm, &[ExecInput::Node(0), ExecInput::Handle(9)]);
    norm.attrs_f32.push(1e-5);
    let mut reshape = ExecNode::new(ExecOp::Reshape, &[ExecInput::Node(1)]);
    reshape.attrs_i64.extend([6]);
    let exec = ExecReq {
        nodes: vec![ExecNode::new(ExecOp::MatMul, &[ExecInput::Handle(1), ExecInput::Handle(2)]), norm, reshape],
        outputs: vec![2],
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "hello_req",
            frame(
                Opcode::Hello,
                0,
                HelloReq { version_min: 1, version_max: 1, token: b"tok".to_vec(), client_name: "c".into() }.to_meta(),
            ),
        ),
        (
            "hello_reply",
            frame(
                Opcode::Hello,
                FLAG_REPLY,
                HelloReply {
                    version: 1,
                    tenant_id: 3,
                    frame_bytes_max: 1 << 26,
                    meta_bytes_max: 65536,
                    backend: "cpu".into(),
                    devices: vec![DeviceInfo { name: "cpu0".into(), memory_bytes: 1 << 30 }],
                    models: vec!["m".into()],
                    transports: vec!["tcp".into(), "shm".into()],
                }
                .to_meta(),
            ),
        ),
        ("ping", frame(Opcode::Ping, 0, vec![])),
        (
            "stats_reply",
            frame(Opcode::Stats, FLAG_REPLY, StatsReply { counters: vec![("requests".into(), 5)] }.to_meta()),
        ),
        ("put", frame(Opcode::TensorPut, 0, TensorPutReq { desc }.to_meta())),
        ("put_reply", frame(Opcode::TensorPut, FLAG_REPLY, TensorPutReply { handle: 4 }.to_meta())),
        ("get", frame(Opcode::TensorGet, 0, TensorGetReq { handle: 4 }.to_meta())),
        ("get_reply", frame(Opcode::TensorGet, FLAG_REPLY, desc.to_meta())),
        ("free", frame(Opcode::TensorFree, 0, TensorFreeReq { handles: vec![4, 5] }.to_meta())),
        ("exec", frame(Opcode::Exec, 0, exec.to_meta())),
        ("exec_reply", frame(Opcode::Exec, FLAG_REPLY, ExecReply { outputs: vec![(7, desc)] }.to_meta())),
        ("error_reply", frame(Opcode::Exec, FLAG_REPLY, b"bad handle 9".to_vec())),
    ];
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(format!("{dir}/seed_{name}"), bytes).unwrap();
    }
}
