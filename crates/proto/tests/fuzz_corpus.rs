//! Replays the saved `frame_decoder` fuzz corpus (fuzz/corpus/frame_decoder) through the same
//! decoders the fuzz target drives, so CI checks it without the fuzzer.

use std::path::Path;

#[test]
fn replay_frame_decoder_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/frame_decoder");
    let mut files = 0;
    let mut decoded_any = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        djinn_proto::check_frame_bytes(&bytes);
        if bytes.len() >= djinn_proto::HEADER_LEN {
            decoded_any += djinn_proto::decode_all_meta(&bytes[djinn_proto::HEADER_LEN..]).min(1);
        }
        files += 1;
    }
    assert!(files >= 12, "expected the seed corpus in {}, found {files} files", dir.display());
    // The seeds are valid frames, so some inputs must decode.
    assert!(decoded_any > 0, "no corpus input decoded");
}
