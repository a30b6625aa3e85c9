//! A bounded walk over field tables on the wire, run before amq-protocol parses them.
//!
//! amq-protocol's parser recurses once per nested table or array, and so do `Clone`,
//! `Drop` and comparison of the values it builds: a peer that nests a few thousand levels
//! in one frame would overflow a worker thread's stack and abort the whole node. This walk
//! uses an explicit stack, checks every length against the bytes that are really there
//! (so no declared length can drive an allocation), accepts only the type codes the parser
//! knows, and refuses nesting deeper than [`MAX_DEPTH`]. Everything that reaches the parser
//! has passed it, so whatever Warren accepts it can also store and read back.
//!
//! Sizes are bounded by the frame: a table is never larger than the negotiated frame_max.

use std::fmt;

/// Deepest nesting of tables and arrays accepted, the outermost table counting as one.
/// Real headers (x-death: a table in an array in a table) use three or four levels.
pub const MAX_DEPTH: usize = 32;

/// Why a field table was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableError {
    /// A length runs past the end of the data.
    Truncated,
    /// A value has a type code that no AMQP 0-9-1 peer defines.
    UnknownType(u8),
    /// Tables and arrays nest deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A field name that is not UTF-8 (names are short strings of text).
    BadName,
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::Truncated => write!(f, "field table truncated"),
            TableError::UnknownType(t) if t.is_ascii_graphic() => {
                write!(f, "unknown field type '{}'", *t as char)
            }
            TableError::UnknownType(t) => write!(f, "unknown field type 0x{t:02x}"),
            TableError::TooDeep => {
                write!(f, "field tables nested deeper than {MAX_DEPTH} levels")
            }
            TableError::BadName => write!(f, "field name is not UTF-8"),
        }
    }
}

/// Bytes that follow a type code of fixed width; `None` for variable or unknown types.
fn fixed_width(code: u8) -> Option<usize> {
    Some(match code {
        b'V' => 0,
        b't' | b'b' | b'B' => 1,
        b's' | b'U' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'D' => 5,
        b'L' | b'l' | b'd' | b'T' => 8,
        _ => return None,
    })
}

/// A cursor over a byte slice that never reads past its end.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, end: usize) -> Result<&'a [u8], TableError> {
        let stop = self.pos.checked_add(n).ok_or(TableError::Truncated)?;
        if stop > end {
            return Err(TableError::Truncated);
        }
        let s = &self.data[self.pos..stop];
        self.pos = stop;
        Ok(s)
    }

    fn u8(&mut self, end: usize) -> Result<u8, TableError> {
        Ok(self.take(1, end)?[0])
    }

    fn u32(&mut self, end: usize) -> Result<usize, TableError> {
        let b = self.take(4, end)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

/// Checks the field table (length-prefixed) at the start of `data` and returns the number
/// of bytes it occupies.
pub fn check_table(data: &[u8]) -> Result<usize, TableError> {
    #[derive(Clone, Copy)]
    enum Kind {
        Table,
        Array,
    }
    let mut cur = Cursor { data, pos: 0 };
    let len = cur.u32(data.len())?;
    let outer_end = cur.pos + len;
    if outer_end > data.len() {
        return Err(TableError::Truncated);
    }
    // (kind, end offset) of every table or array being walked, innermost last.
    let mut open: Vec<(Kind, usize)> = vec![(Kind::Table, outer_end)];
    while let Some(&(kind, end)) = open.last() {
        if cur.pos == end {
            open.pop();
            continue;
        }
        if let Kind::Table = kind {
            let name_len = cur.u8(end)? as usize;
            let name = cur.take(name_len, end)?;
            if std::str::from_utf8(name).is_err() {
                return Err(TableError::BadName);
            }
        }
        let code = cur.u8(end)?;
        if let Some(n) = fixed_width(code) {
            cur.take(n, end)?;
            continue;
        }
        match code {
            b'S' | b'x' => {
                let n = cur.u32(end)?;
                cur.take(n, end)?;
            }
            b'F' | b'A' => {
                let n = cur.u32(end)?;
                let inner_end = cur.pos.checked_add(n).ok_or(TableError::Truncated)?;
                if inner_end > end {
                    return Err(TableError::Truncated);
                }
                if open.len() >= MAX_DEPTH {
                    return Err(TableError::TooDeep);
                }
                let kind = if code == b'F' {
                    Kind::Table
                } else {
                    Kind::Array
                };
                open.push((kind, inner_end));
            }
            other => return Err(TableError::UnknownType(other)),
        }
    }
    Ok(outer_end)
}

/// The argument types of a method, as far as a walk to its field table needs them.
#[derive(Clone, Copy)]
enum Arg {
    Octet,
    Short,
    ShortStr,
    LongStr,
    Table,
}

/// Argument layouts of every 0-9-1 method that carries a field table (whichever side is
/// meant to send it: the parser would read it either way). Bits are packed in octets.
fn table_layout(class: u16, method: u16) -> Option<&'static [Arg]> {
    use Arg::*;
    Some(match (class, method) {
        // connection.start, connection.start-ok
        (10, 10) => &[Octet, Octet, Table, LongStr, LongStr],
        (10, 11) => &[Table, ShortStr, LongStr, ShortStr],
        // exchange.declare
        (40, 10) => &[Short, ShortStr, ShortStr, Octet, Table],
        // exchange.bind, exchange.unbind
        (40, 30) | (40, 40) => &[Short, ShortStr, ShortStr, ShortStr, Octet, Table],
        // queue.declare
        (50, 10) => &[Short, ShortStr, Octet, Table],
        // queue.bind
        (50, 20) => &[Short, ShortStr, ShortStr, ShortStr, Octet, Table],
        // queue.unbind (no bits)
        (50, 50) => &[Short, ShortStr, ShortStr, ShortStr, Table],
        // basic.consume
        (60, 20) => &[Short, ShortStr, ShortStr, Octet, Table],
        _ => return None,
    })
}

/// Checks every field table in a method frame's payload (class id, method id,
/// arguments). Methods without tables pass at once.
pub fn check_method(payload: &[u8]) -> Result<(), TableError> {
    if payload.len() < 4 {
        return Ok(());
    }
    let class = u16::from_be_bytes([payload[0], payload[1]]);
    let method = u16::from_be_bytes([payload[2], payload[3]]);
    let Some(layout) = table_layout(class, method) else {
        return Ok(());
    };
    let end = payload.len();
    let mut cur = Cursor {
        data: payload,
        pos: 4,
    };
    for arg in layout {
        match arg {
            Arg::Octet => {
                cur.take(1, end)?;
            }
            Arg::Short => {
                cur.take(2, end)?;
            }
            Arg::ShortStr => {
                let n = cur.u8(end)? as usize;
                cur.take(n, end)?;
            }
            Arg::LongStr => {
                let n = cur.u32(end)?;
                cur.take(n, end)?;
            }
            Arg::Table => {
                let n = check_table(&payload[cur.pos..])?;
                cur.pos += n;
            }
        }
    }
    Ok(())
}

/// Checks the headers table of raw basic properties (property flags, then values), the
/// only property that nests. content-type and content-encoding (short strings) precede it.
pub fn check_properties(raw: &[u8]) -> Result<(), TableError> {
    if raw.len() < 2 {
        return Ok(());
    }
    let flags = u16::from_be_bytes([raw[0], raw[1]]);
    if flags & (1 << 13) == 0 {
        return Ok(());
    }
    let end = raw.len();
    let mut cur = Cursor { data: raw, pos: 2 };
    for bit in [15, 14] {
        if flags & (1 << bit) != 0 {
            let n = cur.u8(end)? as usize;
            cur.take(n, end)?;
        }
    }
    check_table(&raw[cur.pos..]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::generation::gen_field_table;
    use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};

    fn encode(t: &FieldTable) -> Vec<u8> {
        let ctx = gen_field_table(t)(Vec::new().into()).expect("encodes");
        ctx.into_inner().0
    }

    /// A table whose value `k` nests `levels` arrays, encoded by hand (iteratively).
    fn nested_arrays(levels: usize) -> Vec<u8> {
        let mut v = b"V".to_vec();
        for _ in 0..levels {
            let mut outer = vec![b'A'];
            outer.extend_from_slice(&(v.len() as u32).to_be_bytes());
            outer.extend_from_slice(&v);
            v = outer;
        }
        let mut entry = vec![1, b'k'];
        entry.extend_from_slice(&v);
        let mut t = (entry.len() as u32).to_be_bytes().to_vec();
        t.extend_from_slice(&entry);
        t
    }

    #[test]
    fn every_value_type_the_generator_writes_passes() {
        let mut inner = FieldTable::default();
        inner.insert("s".into(), AMQPValue::LongString(LongString::from("x")));
        let mut t = FieldTable::default();
        t.insert("bool".into(), AMQPValue::Boolean(true));
        t.insert("i8".into(), AMQPValue::ShortShortInt(-1));
        t.insert("u8".into(), AMQPValue::ShortShortUInt(1));
        t.insert("i16".into(), AMQPValue::ShortInt(-1));
        t.insert("u16".into(), AMQPValue::ShortUInt(1));
        t.insert("i32".into(), AMQPValue::LongInt(-1));
        t.insert("u32".into(), AMQPValue::LongUInt(1));
        t.insert("i64".into(), AMQPValue::LongLongInt(-1));
        t.insert("f32".into(), AMQPValue::Float(f32::NAN));
        t.insert("f64".into(), AMQPValue::Double(f64::INFINITY));
        t.insert("ts".into(), AMQPValue::Timestamp(7));
        t.insert("bytes".into(), AMQPValue::ByteArray(vec![1, 2].into()));
        t.insert("void".into(), AMQPValue::Void);
        t.insert(
            "arr".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(inner.clone())])),
        );
        t.insert("tab".into(), AMQPValue::FieldTable(inner));
        let bytes = encode(&t);
        assert_eq!(check_table(&bytes), Ok(bytes.len()));
    }

    #[test]
    fn nesting_is_refused_past_the_limit_without_recursion() {
        let ok = nested_arrays(MAX_DEPTH - 1);
        assert_eq!(check_table(&ok), Ok(ok.len()));
        assert_eq!(
            check_table(&nested_arrays(MAX_DEPTH)),
            Err(TableError::TooDeep)
        );
        // Far deeper than any stack would take by recursion.
        assert_eq!(
            check_table(&nested_arrays(100_000)),
            Err(TableError::TooDeep)
        );
    }

    #[test]
    fn lengths_past_the_data_are_truncation() {
        let mut t = nested_arrays(3);
        t.pop();
        assert_eq!(check_table(&t), Err(TableError::Truncated));
        // A declared length of 4 GiB allocates nothing.
        let huge = [
            0xff, 0xff, 0xff, 0xff, 1, b'k', b'S', 0xff, 0xff, 0xff, 0xff,
        ];
        assert_eq!(check_table(&huge), Err(TableError::Truncated));
    }

    #[test]
    fn names_must_be_text() {
        let t = [0, 0, 0, 4, 2, 0xc3, 0x28, b'V'];
        assert_eq!(check_table(&t), Err(TableError::BadName));
    }

    #[test]
    fn unknown_type_codes_are_refused() {
        let t = [0, 0, 0, 3, 1, b'k', b'Z'];
        assert_eq!(check_table(&t), Err(TableError::UnknownType(b'Z')));
    }

    #[test]
    fn headers_are_found_behind_content_type_and_encoding() {
        let mut raw = vec![0b1110_0000, 0];
        raw.extend_from_slice(&[4, b'j', b's', b'o', b'n', 0]);
        raw.extend_from_slice(&nested_arrays(MAX_DEPTH + 5));
        assert_eq!(check_properties(&raw), Err(TableError::TooDeep));
        let mut fine = vec![0b1110_0000, 0, 0, 0];
        fine.extend_from_slice(&nested_arrays(2));
        assert_eq!(check_properties(&fine), Ok(()));
    }

    #[test]
    fn queue_declare_arguments_are_checked() {
        let mut p = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
        p.extend_from_slice(&nested_arrays(MAX_DEPTH + 1));
        assert_eq!(check_method(&p), Err(TableError::TooDeep));
        let mut ok = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
        ok.extend_from_slice(&nested_arrays(1));
        assert_eq!(check_method(&ok), Ok(()));
    }
}
