//! Fuzz target: any bytes given to the MST node decoder must yield a node or an error, never
//! a panic; a node that decodes must re-encode to bytes that decode to the same node.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run mst_node -O` from the crate root.
#![no_main]

use atproto_ingest::sync::mst::{decode_node, encode_node, key_height};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(node) = decode_node(data) {
        for e in &node.entries {
            let _ = key_height(&e.key);
        }
        let bytes = encode_node(&node).expect("a decoded node encodes");
        assert_eq!(decode_node(&bytes).expect("re-encoded node decodes"), node);
    }
});
