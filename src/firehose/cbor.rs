//! Minimal DAG-CBOR structure walking: finds where one data item ends (to split a frame's
//! header from its body) and reads a map's `$type` without decoding the rest.
//!
//! serde_ipld_dagcbor decodes values but does not say how many bytes a value used, and a
//! frame is two values back to back; walking the item heads here costs a few nanoseconds
//! per byte of header and allocates nothing.

/// Deepest nesting accepted; DAG-CBOR decoders commonly stop at the same depth.
const MAX_DEPTH: usize = 64;

/// Why a CBOR item could not be walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The input ended inside the item.
    Eof,
    /// Indefinite-length item (forbidden by DAG-CBOR).
    Indefinite,
    /// A reserved or unsupported head byte.
    Invalid,
    /// Nested deeper than `MAX_DEPTH`.
    TooDeep,
}

/// Reads an item head: (major type, argument, head length).
fn head(buf: &[u8], pos: usize) -> Result<(u8, u64, usize), WalkError> {
    let b = *buf.get(pos).ok_or(WalkError::Eof)?;
    let major = b >> 5;
    let info = b & 0x1f;
    let (arg, len) = match info {
        0..=23 => (u64::from(info), 1),
        24..=27 => {
            let n = 1usize << (info - 24);
            let bytes = buf.get(pos + 1..pos + 1 + n).ok_or(WalkError::Eof)?;
            let mut v = 0u64;
            for &x in bytes {
                v = (v << 8) | u64::from(x);
            }
            (v, 1 + n)
        }
        31 => return Err(WalkError::Indefinite),
        _ => return Err(WalkError::Invalid),
    };
    Ok((major, arg, len))
}

/// Returns the byte length of the first CBOR data item in `buf`.
pub fn item_len(buf: &[u8]) -> Result<usize, WalkError> {
    skip(buf, 0, 0)
}

fn skip(buf: &[u8], pos: usize, depth: usize) -> Result<usize, WalkError> {
    if depth > MAX_DEPTH {
        return Err(WalkError::TooDeep);
    }
    let (major, arg, hlen) = head(buf, pos)?;
    let mut p = pos + hlen;
    match major {
        0 | 1 => {}
        2 | 3 => {
            let n = usize::try_from(arg).map_err(|_| WalkError::Eof)?;
            p = p.checked_add(n).ok_or(WalkError::Eof)?;
            if p > buf.len() {
                return Err(WalkError::Eof);
            }
        }
        4 | 5 => {
            let items = if major == 5 {
                arg.saturating_mul(2)
            } else {
                arg
            };
            // Each item takes at least one byte: reject impossible counts before looping.
            if items > (buf.len() - p) as u64 {
                return Err(WalkError::Eof);
            }
            for _ in 0..items {
                p += skip(buf, p, depth + 1)?;
            }
        }
        6 => p += skip(buf, p, depth + 1)?,
        _ => {
            // major 7: simple values and floats; the argument bytes were the payload.
            if hlen == 1 && arg > 23 {
                return Err(WalkError::Invalid);
            }
        }
    }
    Ok(p - pos)
}

/// `start + len` as an index, or `None` when it overflows (a length from the input can be
/// as large as `u64::MAX`; plain `+` would panic in debug builds and wrap in release).
fn span_end(start: usize, len: u64) -> Option<usize> {
    usize::try_from(len).ok().and_then(|l| start.checked_add(l))
}

/// What `map_type` found at the top of a record block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopLevel<'a> {
    /// A map; `$type` is its `$type` text value when present.
    Map { type_: Option<&'a str> },
    /// Not a map (array, string, …): never a valid record.
    NotMap,
}

/// Reads the top of a record block: whether it is a map, and its `$type` if present.
pub fn map_type(buf: &[u8]) -> Result<TopLevel<'_>, WalkError> {
    let (major, arg, hlen) = head(buf, 0)?;
    if major != 5 {
        return Ok(TopLevel::NotMap);
    }
    let mut p = hlen;
    for _ in 0..arg {
        let (kmaj, klen, khl) = head(buf, p)?;
        let key_end = span_end(p + khl, klen).ok_or(WalkError::Eof)?;
        let key = buf.get(p + khl..key_end).ok_or(WalkError::Eof)?;
        p = key_end;
        if kmaj == 3 && key == b"$type" {
            let (vmaj, vlen, vhl) = head(buf, p)?;
            if vmaj != 3 {
                return Ok(TopLevel::Map { type_: None });
            }
            let end = span_end(p + vhl, vlen).ok_or(WalkError::Eof)?;
            let v = buf.get(p + vhl..end).ok_or(WalkError::Eof)?;
            return Ok(TopLevel::Map {
                type_: std::str::from_utf8(v).ok(),
            });
        }
        p += skip(buf, p, 1)?;
    }
    Ok(TopLevel::Map { type_: None })
}

/// True when the keys of the top-level map in `buf` are in DAG-CBOR canonical order
/// (shorter first, then bytewise). Non-map input and walk errors count as canonical: other
/// checks report those.
pub fn map_keys_canonical(buf: &[u8]) -> bool {
    let Ok((5, n, hlen)) = head(buf, 0) else {
        return true;
    };
    let mut p = hlen;
    let mut last: Option<&[u8]> = None;
    for _ in 0..n {
        let Ok((3, klen, khl)) = head(buf, p) else {
            return true;
        };
        let Some(key) = span_end(p + khl, klen).and_then(|end| buf.get(p + khl..end)) else {
            return true;
        };
        if let Some(prev) = last {
            if (prev.len(), prev) >= (key.len(), key) {
                return false;
            }
        }
        last = Some(key);
        p += khl + key.len();
        match skip(buf, p, 1) {
            Ok(l) => p += l,
            Err(_) => return true,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_of_simple_items() {
        assert_eq!(item_len(&[0x01]), Ok(1));
        assert_eq!(item_len(&[0x18, 0xff]), Ok(2));
        assert_eq!(item_len(&[0x63, b'a', b'b', b'c', 0x00]), Ok(4));
        // {"a": [1, 2]}
        assert_eq!(item_len(&[0xa1, 0x61, b'a', 0x82, 0x01, 0x02, 0xff]), Ok(6));
        // tag 42 + bytes
        assert_eq!(item_len(&[0xd8, 0x2a, 0x42, 0x00, 0x01]), Ok(5));
        assert_eq!(item_len(&[0xfb, 0, 0, 0, 0, 0, 0, 0, 0]), Ok(9));
    }

    #[test]
    fn errors() {
        assert_eq!(item_len(&[]), Err(WalkError::Eof));
        assert_eq!(item_len(&[0x62, b'a']), Err(WalkError::Eof));
        assert_eq!(item_len(&[0xbf, 0xff]), Err(WalkError::Indefinite));
        assert_eq!(item_len(&[0x1c]), Err(WalkError::Invalid));
        assert_eq!(
            item_len(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(WalkError::Eof)
        );
        let deep = vec![0x81u8; 200];
        assert_eq!(item_len(&deep), Err(WalkError::TooDeep));
    }

    #[test]
    fn huge_declared_lengths_are_errors_not_overflows() {
        // {text(2^64-1): ...}: the key length overflows usize arithmetic.
        let mut m = vec![0xa1, 0x7b];
        m.extend_from_slice(&[0xff; 8]);
        m.push(0x01);
        assert_eq!(map_type(&m), Err(WalkError::Eof));
        assert!(map_keys_canonical(&m));
        // {"$type": text(2^64-1)}
        let mut t = vec![0xa1, 0x65, b'$', b't', b'y', b'p', b'e', 0x7b];
        t.extend_from_slice(&[0xff; 8]);
        assert_eq!(map_type(&t), Err(WalkError::Eof));
    }

    #[test]
    fn finds_type_and_order() {
        // {"$type": "x", "b": 1}
        let m = [
            0xa2, 0x65, b'$', b't', b'y', b'p', b'e', 0x61, b'x', 0x61, b'b', 0x01,
        ];
        assert_eq!(map_type(&m), Ok(TopLevel::Map { type_: Some("x") }));
        assert!(!map_keys_canonical(&m)); // "$type" (5) before "b" (1): longer first
        let ok = [0xa2, 0x61, b'b', 0x01, 0x62, b'a', b'a', 0x02];
        assert!(map_keys_canonical(&ok));
        assert_eq!(map_type(&[0x82, 0x01, 0x02]), Ok(TopLevel::NotMap));
    }
}
