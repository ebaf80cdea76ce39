//! Payloads as jsonb without `jsonb_in`. A claim hands out each event's payload as jsonb, and
//! parsing the payload's JSON text with `jsonb_in` took 7,900 instructions an event, as much
//! as the rest of a claim of single-row events, all of it while the claim holds its
//! subscription's turn. Payloads are objects the claim put together itself, so most are
//! objects of strings, integers, booleans and nulls: those are written here in jsonb's
//! on-disk format (src/include/utils/jsonb.h, which pg_upgrade keeps stable). Anything else
//! (arrays, fractions, escaped strings, repeated keys) is left to `jsonb_in`, and a test
//! compares every shape written here with what `jsonb_in` makes of the same text.

/// `JsonbContainer` header flag of an object.
const JB_FOBJECT: u32 = 0x2000_0000;
const JENTRY_OFFLENMASK: u32 = 0x0FFF_FFFF;
const JENTRY_TYPEMASK: u32 = 0x7000_0000;
const JENTRY_HAS_OFF: u32 = 0x8000_0000;
const JENTRY_ISSTRING: u32 = 0x0000_0000;
const JENTRY_ISNUMERIC: u32 = 0x1000_0000;
const JENTRY_ISBOOL_FALSE: u32 = 0x2000_0000;
const JENTRY_ISBOOL_TRUE: u32 = 0x3000_0000;
const JENTRY_ISNULL: u32 = 0x4000_0000;
const JENTRY_ISCONTAINER: u32 = 0x5000_0000;
/// Every this many entries of a container stores an end offset instead of a length.
const JB_OFFSET_STRIDE: usize = 32;
/// Deeper nesting is left to `jsonb_in`.
const MAX_DEPTH: usize = 32;

enum Value<'a> {
    String(&'a [u8]),
    Integer(i64),
    Bool(bool),
    Null,
    Object(Vec<(&'a [u8], Value<'a>)>),
}

/// Appends the varlena bytes of Postgres' numeric for an integer.
pub type Numeric<'f> = &'f mut dyn FnMut(i64, &mut Vec<u8>);

/// The jsonb datum of `json`, an object, as a varlena with a 4-byte header (the header's
/// bytes are left for the caller to set); None when `json` holds anything this module leaves
/// to `jsonb_in`.
pub fn encode(json: &str, numeric: Numeric) -> Option<Vec<u8>> {
    let mut parser = Parser { bytes: json.as_bytes(), at: 0 };
    parser.whitespace();
    let Value::Object(pairs) = parser.value(0)? else { return None };
    parser.whitespace();
    if parser.at != parser.bytes.len() {
        return None;
    }
    let mut out = Vec::with_capacity(json.len() + 64);
    out.extend_from_slice(&[0; 4]);
    write_object(&mut out, pairs, numeric)?;
    // as jsonb_in, which refuses a document this large
    (out.len() - 4 <= JENTRY_OFFLENMASK as usize).then_some(out)
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.bytes[self.at..].starts_with(word).then(|| self.at += word.len())
    }

    fn value(&mut self, depth: usize) -> Option<Value<'a>> {
        match self.peek()? {
            b'{' if depth < MAX_DEPTH => self.object(depth + 1),
            b'"' => self.string().map(Value::String),
            b't' => self.literal(b"true").map(|_| Value::Bool(true)),
            b'f' => self.literal(b"false").map(|_| Value::Bool(false)),
            b'n' => self.literal(b"null").map(|_| Value::Null),
            b'-' | b'0'..=b'9' => self.integer().map(Value::Integer),
            _ => None,
        }
    }

    fn object(&mut self, depth: usize) -> Option<Value<'a>> {
        self.at += 1;
        let mut pairs = Vec::new();
        self.whitespace();
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(Value::Object(pairs));
        }
        loop {
            self.whitespace();
            let key = self.string()?;
            self.whitespace();
            (self.peek()? == b':').then(|| self.at += 1)?;
            self.whitespace();
            pairs.push((key, self.value(depth)?));
            self.whitespace();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(Value::Object(pairs));
                }
                _ => return None,
            }
        }
    }

    /// A string without escapes, as its bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        (self.peek()? == b'"').then_some(())?;
        let start = self.at + 1;
        let length = self.bytes[start..].iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        let end = start + length;
        (self.bytes[end] == b'"').then_some(())?;
        self.at = end + 1;
        Some(&self.bytes[start..end])
    }

    /// An integer as JSON writes it (no leading zeros, no fraction or exponent).
    fn integer(&mut self) -> Option<i64> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        let digits = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        let count = self.at - digits;
        if count == 0 || (count > 1 && self.bytes[digits] == b'0') || matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        std::str::from_utf8(&self.bytes[start..self.at]).ok()?.parse().ok()
    }
}

/// Pads `out` to a 4-byte boundary, as jsonb aligns numerics and containers; the bytes added.
fn pad(out: &mut Vec<u8>) -> u32 {
    let padding = (4 - out.len() % 4) % 4;
    out.resize(out.len() + padding, 0);
    padding as u32
}

/// Writes an object container: the header, then the keys' entries and the values' entries,
/// then the keys' bytes and the values' data, keys ordered by length and then by bytes.
fn write_object(out: &mut Vec<u8>, mut pairs: Vec<(&[u8], Value)>, numeric: Numeric) -> Option<()> {
    pairs.sort_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    if pairs.windows(2).any(|w| w[0].0 == w[1].0) {
        return None;
    }
    let count = pairs.len();
    out.extend_from_slice(&(count as u32 | JB_FOBJECT).to_ne_bytes());
    let entries = out.len();
    out.resize(entries + 8 * count, 0);
    let mut total: u32 = 0;
    let mut entry = |out: &mut Vec<u8>, index: usize, kind: u32, length: u32| -> Option<()> {
        total = total.checked_add(length).filter(|t| *t <= JENTRY_OFFLENMASK)?;
        let meta = if index % JB_OFFSET_STRIDE == 0 { kind | total | JENTRY_HAS_OFF } else { kind | length };
        out[entries + 4 * index..entries + 4 * index + 4].copy_from_slice(&meta.to_ne_bytes());
        Some(())
    };
    for (index, (key, _)) in pairs.iter().enumerate() {
        out.extend_from_slice(key);
        entry(out, index, JENTRY_ISSTRING, key.len() as u32)?;
    }
    for (index, (_, value)) in pairs.into_iter().enumerate() {
        let (kind, length) = match value {
            Value::String(bytes) => {
                out.extend_from_slice(bytes);
                (JENTRY_ISSTRING, bytes.len() as u32)
            }
            Value::Integer(i) => {
                let padding = pad(out);
                let start = out.len();
                numeric(i, out);
                (JENTRY_ISNUMERIC, padding + (out.len() - start) as u32)
            }
            Value::Bool(true) => (JENTRY_ISBOOL_TRUE, 0),
            Value::Bool(false) => (JENTRY_ISBOOL_FALSE, 0),
            Value::Null => (JENTRY_ISNULL, 0),
            Value::Object(pairs) => {
                let padding = pad(out);
                let start = out.len();
                write_object(out, pairs, numeric)?;
                (JENTRY_ISCONTAINER, padding + (out.len() - start) as u32)
            }
        };
        debug_assert_eq!(kind & !JENTRY_TYPEMASK, 0);
        entry(out, count + index, kind, length)?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_numbers(_: i64, _: &mut Vec<u8>) {
        panic!("no number expected")
    }

    #[test]
    fn shapes_left_to_jsonb_in_are_refused() {
        for json in [
            "[1]",
            "\"a\"",
            "{\"a\": [1]}",
            "{\"a\": 1.5}",
            "{\"a\": 1e3}",
            "{\"a\": 012}",
            "{\"a\": \"x\\\"y\"}",
            "{\"a\": 1, \"a\": 2}",
            "{\"a\": 99999999999999999999}",
            "{\"a\": tru}",
            "{\"a\": 1} x",
            "{\"a\": 1,}",
            "{",
        ] {
            assert!(encode(json, &mut |_, out| out.extend_from_slice(&[0; 8])).is_none(), "{json}");
        }
    }

    #[test]
    fn an_object_of_strings_is_sorted_by_length_then_bytes() {
        let out = encode(r#"{"bb": "x", "a": "yz", "ab": ""}"#, &mut no_numbers).unwrap();
        let word = |i: usize| u32::from_ne_bytes(out[4 + 4 * i..8 + 4 * i].try_into().unwrap());
        assert_eq!(word(0), 3 | JB_FOBJECT);
        // keys a, ab, bb: the first entry holds its end offset, the others their lengths
        assert_eq!([word(1), word(2), word(3)], [1 | JENTRY_HAS_OFF, 2, 2]);
        // values "yz", "", "x"
        assert_eq!([word(4), word(5), word(6)], [2, 0, 1]);
        assert_eq!(&out[4 + 4 * 7..], b"aabbbyzx");
    }
}
