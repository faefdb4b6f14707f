//! `SignatureHeader::parse` on arbitrary bytes: never panics, and accepts only
//! `sha256=` + 64 hex digits (surrounding blanks allowed), whose digest re-parses identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nen_relay::callbacks::signature::SignatureHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = SignatureHeader::parse(data) {
        let value = data.trim_ascii();
        assert!(value.starts_with(b"sha256="), "accepted without the label");
        assert_eq!(value.len(), 7 + 64, "accepted a digest of the wrong length");
        assert!(value[7..].iter().all(u8::is_ascii_hexdigit));
        let canonical = format!("sha256={}", hex::encode(header.digest()));
        assert_eq!(SignatureHeader::parse(canonical.as_bytes()), Ok(header));
    }
});
