//! Payload shaping: how captured rows become event ids, types, key hashes and the JSON text of
//! keys and data. Pure Rust; the capture trigger feeds it already-encoded column values.

/// Events captured by one statement are stored together, up to this many per log row. Event
/// ids are `base + ordinal − 1` where `base` comes from a sequence that steps by this amount, so
/// an id names its log row without a lookup (`id - (id - 1) % 4096` in the queries).
pub const EVENTS_PER_ROW: i64 = 4096;

/// What happened to a source row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Upsert,
    Delete,
    Truncate,
}

impl Op {
    /// The `op` column's "char".
    pub fn code(self) -> u8 {
        match self {
            Op::Upsert => b'U',
            Op::Delete => b'D',
            Op::Truncate => b'T',
        }
    }

    pub fn event_type(self, prefix: &str) -> String {
        let suffix = match self {
            Op::Upsert => "UPSERT",
            Op::Delete => "DELETE",
            Op::Truncate => "TRUNCATE",
        };
        format!("{prefix}_{suffix}")
    }
}

/// Checks an `event_prefix`: event types are matched by consumers and used as metric labels,
/// so they are kept to identifier characters.
pub fn check_event_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() {
        return Err("it must not be empty");
    }
    if prefix.len() > 48 {
        return Err("it must be at most 48 characters");
    }
    if !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err("only letters, digits and underscores are allowed");
    }
    Ok(())
}

/// 64-bit FNV-1a. Key hashes are stored in the log and compared by later claims, so the hash
/// must be the same in every backend and every build, which std's hasher does not promise.
fn fnv1a(parts: &[&[u8]]) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash as i64
}

/// Identifies a source row (table + key) for per-key exclusivity.
pub fn key_hash(source: u32, key_json: &str) -> i64 {
    fnv1a(&[&source.to_le_bytes(), b"k", key_json.as_bytes()])
}

/// Identifies a whole table. A TRUNCATE event carries it as its key, and every row event of
/// the table carries it as its barrier, so a TRUNCATE is ordered against all of them.
pub fn table_hash(source: u32) -> i64 {
    fnv1a(&[&source.to_le_bytes(), b"t"])
}

/// Appends `value` to `out` as a JSON string, escaped the way Postgres' `escape_json` does.
pub fn push_json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The start of a JSON object member, `"name":`, computed once per column.
pub fn member_prefix(name: &str) -> String {
    let mut prefix = String::with_capacity(name.len() + 3);
    push_json_string(&mut prefix, name);
    prefix.push(':');
    prefix
}

/// Appends an integer in decimal, without the formatting machinery (it runs once per row).
pub fn push_int(out: &mut String, value: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        out.push('-');
    }
    // SAFETY: ASCII digits are valid UTF-8 (checking them cost as much as the rest)
    unsafe { out.as_mut_vec().extend_from_slice(&digits[at..]) };
}

/// Joins already-encoded JSON values into one JSON array.
pub fn json_array<'a, I>(items: I) -> String
where
    I: IntoIterator<Item = &'a str>,
    I::IntoIter: Clone,
{
    let items = items.into_iter();
    // sized up front: one allocation per array (this runs for every log row)
    let mut out = String::with_capacity(items.clone().map(|item| item.len() + 1).sum::<usize>() + 2);
    out.push('[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
    out.push(']');
    out
}

/// The elements of a JSON array as the text they were written with, or None if `text` is not
/// an array. The log's `keys` and `data` arrays are written by the capture trigger (older
/// releases wrote them through jsonb, with spaces), so this only finds the top-level commas.
pub fn json_array_elements(text: &str) -> Option<Vec<&str>> {
    let inner = text.trim().strip_prefix('[')?.strip_suffix(']')?;
    let mut elements = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut start) = (0usize, false, false, 0);
    for (at, byte) in inner.bytes().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.checked_sub(1)?,
            b',' if depth == 0 => {
                elements.push(inner[start..at].trim());
                start = at + 1;
            }
            _ => {}
        }
    }
    if in_string || depth != 0 {
        return None;
    }
    let last = inner[start..].trim();
    if !(last.is_empty() && elements.is_empty()) {
        elements.push(last);
    }
    Some(elements)
}

/// An event's payload as JSON text: `{"table": ..., "key": ..., "data": ...}`, with only the
/// table for a TRUNCATE (its key is null) and no data unless payload columns were captured.
/// `table` is already a JSON string.
pub fn event_payload(table: &str, key: &str, data: Option<&str>) -> String {
    let mut out = String::with_capacity(24 + table.len() + key.len() + data.map_or(0, str::len));
    out.push_str("{\"table\":");
    out.push_str(table);
    if key != "null" {
        out.push_str(",\"key\":");
        out.push_str(key);
        if let Some(data) = data {
            out.push_str(",\"data\":");
            out.push_str(data);
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_use_the_prefix() {
        assert_eq!(Op::Upsert.event_type("EMBED"), "EMBED_UPSERT");
        assert_eq!(Op::Delete.event_type("DOC"), "DOC_DELETE");
        assert_eq!(Op::Truncate.event_type("EMBED"), "EMBED_TRUNCATE");
    }

    #[test]
    fn event_prefix_rules() {
        assert!(check_event_prefix("EMBED_V2").is_ok());
        assert_eq!(check_event_prefix(""), Err("it must not be empty"));
        assert!(check_event_prefix("bad prefix").is_err());
        assert!(check_event_prefix("x\"y").is_err());
        assert!(check_event_prefix(&"A".repeat(49)).is_err());
    }

    #[test]
    fn key_hashes_separate_tables_keys_and_whole_tables() {
        let a = key_hash(100, r#"{"id":1}"#);
        assert_eq!(a, key_hash(100, r#"{"id":1}"#), "stable");
        assert_ne!(a, key_hash(101, r#"{"id":1}"#), "same key, other table");
        assert_ne!(a, key_hash(100, r#"{"id":2}"#), "other key");
        assert_ne!(table_hash(100), key_hash(100, ""), "table hash differs from any key hash");
        // pinned value: a change of the hash function would break in-flight exclusivity
        assert_eq!(table_hash(0), fnv1a(&[&[0, 0, 0, 0], b"t"]));
        assert_eq!(fnv1a(&[b"a"]), 0xaf63dc4c8601ec8c_u64 as i64);
    }

    #[test]
    fn strings_are_escaped_like_postgres() {
        let mut out = String::new();
        push_json_string(&mut out, "a\"b\\c\nd\te\u{1}é");
        assert_eq!(out, r#""a\"b\\c\nd\te\u0001é""#);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed, "a\"b\\c\nd\te\u{1}é");
    }

    #[test]
    fn member_prefixes_are_escaped_names() {
        assert_eq!(member_prefix("id"), r#""id":"#);
        assert_eq!(member_prefix("doc \"id\""), r#""doc \"id\"":"#);
    }

    #[test]
    fn integers_print_like_postgres() {
        for value in [0, 7, -7, 1234567890123, i64::MAX, i64::MIN] {
            let mut out = String::new();
            push_int(&mut out, value);
            assert_eq!(out, value.to_string());
        }
    }

    #[test]
    fn arrays_join_encoded_values() {
        assert_eq!(json_array(["1", "{\"a\":2}", "null"]), r#"[1,{"a":2},null]"#);
        assert_eq!(json_array(Vec::<&str>::new()), "[]");
    }

    #[test]
    fn array_elements_are_split_at_top_level_commas_only() {
        assert_eq!(json_array_elements(r#"[1,{"a":[2,3]},null]"#).unwrap(), vec!["1", r#"{"a":[2,3]}"#, "null"]);
        assert_eq!(
            json_array_elements(r#"[{"k": "a,b]}"}, {"k": "c\"d"}]"#).unwrap(),
            vec![r#"{"k": "a,b]}"}"#, r#"{"k": "c\"d"}"#],
            "commas and brackets inside strings, escaped quotes, jsonb's spacing"
        );
        assert_eq!(json_array_elements(r#"["\\", 2]"#).unwrap(), vec![r#""\\""#, "2"], "an escaped backslash ends no string");
        assert_eq!(json_array_elements("[]").unwrap(), Vec::<&str>::new());
        assert_eq!(json_array_elements(" [ 7 ] ").unwrap(), vec!["7"]);
        for broken in ["", "{}", "[1", r#"["a]"#, "[1]]", "[{]"] {
            assert_eq!(json_array_elements(broken), None, "{broken}");
        }
    }

    #[test]
    fn payloads_carry_table_key_and_data_only_when_present() {
        assert_eq!(event_payload(r#""public.t""#, r#"{"id":1}"#, None), r#"{"table":"public.t","key":{"id":1}}"#);
        assert_eq!(
            event_payload(r#""public.t""#, r#"{"id":1}"#, Some(r#"{"doc":"x"}"#)),
            r#"{"table":"public.t","key":{"id":1},"data":{"doc":"x"}}"#
        );
        assert_eq!(event_payload(r#""public.t""#, r#"{"id":1}"#, Some("null")), r#"{"table":"public.t","key":{"id":1},"data":null}"#);
        assert_eq!(event_payload(r#""public.t""#, "null", Some("null")), r#"{"table":"public.t"}"#, "a TRUNCATE");
        let parsed: serde_json::Value = serde_json::from_str(&event_payload(r#""s.t""#, r#"{"a": [1, 2]}"#, Some("{}"))).unwrap();
        assert_eq!(parsed, serde_json::json!({"table": "s.t", "key": {"a": [1, 2]}, "data": {}}));
    }
}
