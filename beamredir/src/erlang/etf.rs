//! The external term format (ERTS "External Term Format"), as far as beamredir exchanges terms
//! with a node: a decoder that is bounded for hostile input, and an encoder.
//!
//! Bounds: the caller bounds the bytes (a distribution message is capped before it is read);
//! the decoder bounds nesting depth and the total number of terms, and never reserves more
//! elements than there are bytes left (every element takes at least one byte). Compressed
//! terms, atom-cache references and `LOCAL_EXT` are refused: a node sends them only to peers
//! that advertised the matching capability, and beamredir advertises none of those.
use std::fmt;

use thiserror::Error;

pub const VERSION: u8 = 131;

const NEW_FLOAT_EXT: u8 = 70;
const BIT_BINARY_EXT: u8 = 77;
const NEW_PID_EXT: u8 = 88;
const NEW_PORT_EXT: u8 = 89;
const NEWER_REFERENCE_EXT: u8 = 90;
const SMALL_INTEGER_EXT: u8 = 97;
const INTEGER_EXT: u8 = 98;
const FLOAT_EXT: u8 = 99;
const ATOM_EXT: u8 = 100;
const REFERENCE_EXT: u8 = 101;
const PORT_EXT: u8 = 102;
const PID_EXT: u8 = 103;
const SMALL_TUPLE_EXT: u8 = 104;
const LARGE_TUPLE_EXT: u8 = 105;
const NIL_EXT: u8 = 106;
const STRING_EXT: u8 = 107;
const LIST_EXT: u8 = 108;
const BINARY_EXT: u8 = 109;
const SMALL_BIG_EXT: u8 = 110;
const LARGE_BIG_EXT: u8 = 111;
const NEW_FUN_EXT: u8 = 112;
const EXPORT_EXT: u8 = 113;
const NEW_REFERENCE_EXT: u8 = 114;
const SMALL_ATOM_EXT: u8 = 115;
const MAP_EXT: u8 = 116;
const ATOM_UTF8_EXT: u8 = 118;
const SMALL_ATOM_UTF8_EXT: u8 = 119;
const V4_PORT_EXT: u8 = 120;

/// An Erlang term.
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    Atom(String),
    Int(i64),
    /// An integer outside `i64`: sign and little-endian magnitude, as on the wire.
    BigInt { negative: bool, magnitude_le: Vec<u8> },
    Float(f64),
    Binary(Vec<u8>),
    /// A bitstring whose last byte holds `bits` (1-8) bits.
    BitBinary { bytes: Vec<u8>, bits: u8 },
    Tuple(Vec<Term>),
    /// A list of small integers sent compactly (`STRING_EXT`).
    Chars(Vec<u8>),
    /// A list; `tail` is [`Term::Nil`] for a proper list.
    List(Vec<Term>, Box<Term>),
    Nil,
    Map(Vec<(Term, Term)>),
    Pid(Pid),
    Port { node: String, id: u64, creation: u32 },
    Ref(Reference),
    /// A fun, kept as its encoded bytes (tag included): printable, not interpretable.
    Fun(Vec<u8>),
    /// `fun M:F/A`.
    Export { module: String, function: String, arity: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pid {
    pub node: String,
    pub id: u32,
    pub serial: u32,
    pub creation: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub node: String,
    pub creation: u32,
    /// 1 to 5 words.
    pub ids: Vec<u32>,
}

impl Term {
    pub fn atom(s: &str) -> Term {
        Term::Atom(s.to_string())
    }
    pub fn tuple(items: Vec<Term>) -> Term {
        Term::Tuple(items)
    }
    pub fn list(items: Vec<Term>) -> Term {
        if items.is_empty() { Term::Nil } else { Term::List(items, Box::new(Term::Nil)) }
    }
    pub fn as_atom(&self) -> Option<&str> {
        match self {
            Term::Atom(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_tuple(&self) -> Option<&[Term]> {
        match self {
            Term::Tuple(t) => Some(t),
            _ => None,
        }
    }
    /// The bytes of a binary, or of a list of bytes (a charlist of Latin-1 text).
    pub fn as_bytes(&self) -> Option<Vec<u8>> {
        match self {
            Term::Binary(b) | Term::Chars(b) => Some(b.clone()),
            Term::Nil => Some(Vec::new()),
            Term::List(items, tail) if **tail == Term::Nil => {
                items.iter().map(|t| match t {
                    Term::Int(i) => u8::try_from(*i).ok(),
                    _ => None,
                })
                .collect()
            }
            _ => None,
        }
    }
    /// A tuple whose first element is the atom `tag`.
    pub fn is_tagged(&self, tag: &str) -> bool {
        self.as_tuple().and_then(|t| t.first()).and_then(Term::as_atom) == Some(tag)
    }
}

/// Decoding bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deepest nesting of tuples, lists and maps.
    pub max_depth: usize,
    /// Most terms in one decoded value, counting every nested one.
    pub max_terms: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_depth: 128, max_terms: 1_000_000 }
    }
}

/// Why bytes are not an acceptable term.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EtfError {
    #[error("term data ends early")]
    Truncated,
    #[error("term data does not start with version byte 131 (got {0})")]
    BadVersion(u8),
    #[error("unsupported or invalid term tag {0}")]
    BadTag(u8),
    #[error("an atom is not valid UTF-8")]
    BadAtom,
    #[error("a reference has {0} id words (1 to 5 allowed)")]
    BadReference(u16),
    #[error("a float in text form cannot be read")]
    BadFloat,
    #[error("a bitstring has {0} bits in its last byte")]
    BadBits(u8),
    #[error("terms nest deeper than {0}")]
    TooDeep(usize),
    #[error("more than {0} terms in one value")]
    TooMany(usize),
}

struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    terms: usize,
    limits: Limits,
}

/// Decodes one term that starts with the version byte; returns it and the bytes used.
pub fn decode(buf: &[u8], limits: Limits) -> Result<(Term, usize), EtfError> {
    let mut d = Decoder { buf, pos: 0, terms: 0, limits };
    let v = d.u8()?;
    if v != VERSION {
        return Err(EtfError::BadVersion(v));
    }
    let t = d.term(0)?;
    Ok((t, d.pos))
}

impl<'a> Decoder<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], EtfError> {
        let end = self.pos.checked_add(n).ok_or(EtfError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(EtfError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], EtfError> {
        self.bytes(N)?.try_into().map_err(|_| EtfError::Truncated)
    }
    fn u8(&mut self) -> Result<u8, EtfError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, EtfError> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Result<u32, EtfError> {
        self.array().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, EtfError> {
        self.array().map(u64::from_be_bytes)
    }
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
    /// A count of elements that each take at least one byte: refuse what cannot fit.
    fn count(&mut self, n: usize) -> Result<usize, EtfError> {
        if n > self.remaining() {
            return Err(EtfError::Truncated);
        }
        Ok(n)
    }

    fn term(&mut self, depth: usize) -> Result<Term, EtfError> {
        if depth > self.limits.max_depth {
            return Err(EtfError::TooDeep(self.limits.max_depth));
        }
        self.terms += 1;
        if self.terms > self.limits.max_terms {
            return Err(EtfError::TooMany(self.limits.max_terms));
        }
        let tag = self.u8()?;
        Ok(match tag {
            SMALL_INTEGER_EXT => Term::Int(i64::from(self.u8()?)),
            INTEGER_EXT => Term::Int(i64::from(self.u32()? as i32)),
            NEW_FLOAT_EXT => Term::Float(f64::from_bits(self.u64()?)),
            FLOAT_EXT => {
                let text = self.bytes(31)?;
                let text = std::str::from_utf8(text).map_err(|_| EtfError::BadFloat)?;
                Term::Float(text.trim_end_matches('\0').trim().parse().map_err(|_| EtfError::BadFloat)?)
            }
            ATOM_EXT | SMALL_ATOM_EXT | ATOM_UTF8_EXT | SMALL_ATOM_UTF8_EXT => Term::Atom(self.atom_body(tag)?),
            SMALL_TUPLE_EXT => {
                let n = usize::from(self.u8()?);
                self.tuple(n, depth)?
            }
            LARGE_TUPLE_EXT => {
                let n = self.u32()? as usize;
                self.tuple(n, depth)?
            }
            NIL_EXT => Term::Nil,
            STRING_EXT => {
                let n = usize::from(self.u16()?);
                Term::Chars(self.bytes(n)?.to_vec())
            }
            LIST_EXT => {
                let n = self.u32()? as usize;
                let n = self.count(n)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.term(depth + 1)?);
                }
                let tail = self.term(depth + 1)?;
                if items.is_empty() { tail } else { Term::List(items, Box::new(tail)) }
            }
            BINARY_EXT => {
                let n = self.u32()? as usize;
                Term::Binary(self.bytes(n)?.to_vec())
            }
            BIT_BINARY_EXT => {
                let n = self.u32()? as usize;
                let bits = self.u8()?;
                if !(1..=8).contains(&bits) || n == 0 {
                    return Err(EtfError::BadBits(bits));
                }
                Term::BitBinary { bytes: self.bytes(n)?.to_vec(), bits }
            }
            SMALL_BIG_EXT | LARGE_BIG_EXT => {
                let n = if tag == SMALL_BIG_EXT { usize::from(self.u8()?) } else { self.u32()? as usize };
                let negative = self.u8()? != 0;
                let magnitude = self.bytes(n)?;
                big_to_term(negative, magnitude)
            }
            MAP_EXT => {
                let n = self.u32()? as usize;
                let n = self.count(n.saturating_mul(2))? / 2;
                let mut pairs = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = self.term(depth + 1)?;
                    let v = self.term(depth + 1)?;
                    pairs.push((k, v));
                }
                Term::Map(pairs)
            }
            PID_EXT | NEW_PID_EXT => {
                let node = self.node()?;
                let (id, serial) = (self.u32()?, self.u32()?);
                let creation = if tag == PID_EXT { u32::from(self.u8()?) } else { self.u32()? };
                Term::Pid(Pid { node, id, serial, creation })
            }
            PORT_EXT | NEW_PORT_EXT | V4_PORT_EXT => {
                let node = self.node()?;
                let id = if tag == V4_PORT_EXT { self.u64()? } else { u64::from(self.u32()?) };
                let creation = if tag == PORT_EXT { u32::from(self.u8()?) } else { self.u32()? };
                Term::Port { node, id, creation }
            }
            REFERENCE_EXT => {
                let node = self.node()?;
                let id = self.u32()?;
                let creation = u32::from(self.u8()?);
                Term::Ref(Reference { node, creation, ids: vec![id] })
            }
            NEW_REFERENCE_EXT | NEWER_REFERENCE_EXT => {
                let len = self.u16()?;
                if !(1..=5).contains(&len) {
                    return Err(EtfError::BadReference(len));
                }
                let node = self.node()?;
                let creation = if tag == NEW_REFERENCE_EXT { u32::from(self.u8()?) } else { self.u32()? };
                let ids = (0..len).map(|_| self.u32()).collect::<Result<_, _>>()?;
                Term::Ref(Reference { node, creation, ids })
            }
            NEW_FUN_EXT => {
                // Size counts itself and everything after the tag.
                let start = self.pos - 1;
                let size = self.u32()? as usize;
                let rest = size.checked_sub(4).ok_or(EtfError::Truncated)?;
                self.bytes(rest)?;
                Term::Fun(self.buf[start..self.pos].to_vec())
            }
            EXPORT_EXT => {
                let module = self.atom()?;
                let function = self.atom()?;
                let arity = match self.term(depth + 1)? {
                    Term::Int(a) => u8::try_from(a).map_err(|_| EtfError::BadTag(EXPORT_EXT))?,
                    _ => return Err(EtfError::BadTag(EXPORT_EXT)),
                };
                Term::Export { module, function, arity }
            }
            other => return Err(EtfError::BadTag(other)),
        })
    }

    fn tuple(&mut self, n: usize, depth: usize) -> Result<Term, EtfError> {
        let n = self.count(n)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.term(depth + 1)?);
        }
        Ok(Term::Tuple(items))
    }

    fn atom(&mut self) -> Result<String, EtfError> {
        let tag = self.u8()?;
        self.atom_body(tag)
    }

    fn atom_body(&mut self, tag: u8) -> Result<String, EtfError> {
        let n = match tag {
            ATOM_EXT | ATOM_UTF8_EXT => usize::from(self.u16()?),
            SMALL_ATOM_EXT | SMALL_ATOM_UTF8_EXT => usize::from(self.u8()?),
            other => return Err(EtfError::BadTag(other)),
        };
        let bytes = self.bytes(n)?;
        if matches!(tag, ATOM_EXT | SMALL_ATOM_EXT) {
            Ok(bytes.iter().map(|&b| char::from(b)).collect())
        } else {
            String::from_utf8(bytes.to_vec()).map_err(|_| EtfError::BadAtom)
        }
    }

    /// The node of a pid, port or reference: an atom.
    fn node(&mut self) -> Result<String, EtfError> {
        self.atom()
    }
}

fn big_to_term(negative: bool, magnitude_le: &[u8]) -> Term {
    let significant = magnitude_le.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    if significant <= 8 {
        let mut le = [0u8; 8];
        le[..significant].copy_from_slice(&magnitude_le[..significant]);
        let m = u64::from_le_bytes(le);
        let v = if negative { 0i64.checked_sub_unsigned(m) } else { i64::try_from(m).ok() };
        if let Some(v) = v {
            return Term::Int(v);
        }
    }
    Term::BigInt { negative, magnitude_le: magnitude_le[..significant].to_vec() }
}

/// Encodes a term with the version byte.
pub fn encode(term: &Term) -> Vec<u8> {
    let mut out = vec![VERSION];
    encode_into(term, &mut out);
    out
}

fn put_len32(out: &mut Vec<u8>, n: usize) {
    // Terms beamredir builds are far below 4 GiB; saturate rather than wrap.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn encode_atom(s: &str, out: &mut Vec<u8>) {
    match u8::try_from(s.len()) {
        Ok(n) => {
            out.push(SMALL_ATOM_UTF8_EXT);
            out.push(n);
        }
        Err(_) => {
            out.push(ATOM_UTF8_EXT);
            out.extend_from_slice(&u16::try_from(s.len()).unwrap_or(u16::MAX).to_be_bytes());
        }
    }
    out.extend_from_slice(&s.as_bytes()[..s.len().min(usize::from(u16::MAX))]);
}

fn encode_into(term: &Term, out: &mut Vec<u8>) {
    match term {
        Term::Atom(a) => encode_atom(a, out),
        Term::Int(i) => {
            if let Ok(b) = u8::try_from(*i) {
                out.extend_from_slice(&[SMALL_INTEGER_EXT, b]);
            } else if let Ok(w) = i32::try_from(*i) {
                out.push(INTEGER_EXT);
                out.extend_from_slice(&w.to_be_bytes());
            } else {
                let m = i.unsigned_abs().to_le_bytes();
                let n = m.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                out.extend_from_slice(&[SMALL_BIG_EXT, n as u8, u8::from(*i < 0)]);
                out.extend_from_slice(&m[..n]);
            }
        }
        Term::BigInt { negative, magnitude_le } => {
            if let Ok(n) = u8::try_from(magnitude_le.len()) {
                out.extend_from_slice(&[SMALL_BIG_EXT, n]);
            } else {
                out.push(LARGE_BIG_EXT);
                put_len32(out, magnitude_le.len());
            }
            out.push(u8::from(*negative));
            out.extend_from_slice(magnitude_le);
        }
        Term::Float(f) => {
            out.push(NEW_FLOAT_EXT);
            out.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        Term::Binary(b) => {
            out.push(BINARY_EXT);
            put_len32(out, b.len());
            out.extend_from_slice(b);
        }
        Term::BitBinary { bytes, bits } => {
            out.push(BIT_BINARY_EXT);
            put_len32(out, bytes.len());
            out.push(*bits);
            out.extend_from_slice(bytes);
        }
        Term::Tuple(items) => {
            if let Ok(n) = u8::try_from(items.len()) {
                out.extend_from_slice(&[SMALL_TUPLE_EXT, n]);
            } else {
                out.push(LARGE_TUPLE_EXT);
                put_len32(out, items.len());
            }
            items.iter().for_each(|t| encode_into(t, out));
        }
        Term::Chars(b) if b.is_empty() => out.push(NIL_EXT),
        Term::Chars(b) => match u16::try_from(b.len()) {
            Ok(n) => {
                out.push(STRING_EXT);
                out.extend_from_slice(&n.to_be_bytes());
                out.extend_from_slice(b);
            }
            Err(_) => {
                out.push(LIST_EXT);
                put_len32(out, b.len());
                for &c in b {
                    out.extend_from_slice(&[SMALL_INTEGER_EXT, c]);
                }
                out.push(NIL_EXT);
            }
        },
        Term::List(items, tail) => {
            if items.is_empty() {
                return encode_into(tail, out);
            }
            out.push(LIST_EXT);
            put_len32(out, items.len());
            items.iter().for_each(|t| encode_into(t, out));
            encode_into(tail, out);
        }
        Term::Nil => out.push(NIL_EXT),
        Term::Map(pairs) => {
            out.push(MAP_EXT);
            put_len32(out, pairs.len());
            for (k, v) in pairs {
                encode_into(k, out);
                encode_into(v, out);
            }
        }
        Term::Pid(p) => {
            out.push(NEW_PID_EXT);
            encode_atom(&p.node, out);
            out.extend_from_slice(&p.id.to_be_bytes());
            out.extend_from_slice(&p.serial.to_be_bytes());
            out.extend_from_slice(&p.creation.to_be_bytes());
        }
        Term::Port { node, id, creation } => {
            out.push(V4_PORT_EXT);
            encode_atom(node, out);
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&creation.to_be_bytes());
        }
        Term::Ref(r) => {
            out.push(NEWER_REFERENCE_EXT);
            let ids = &r.ids[..r.ids.len().min(5)];
            out.extend_from_slice(&(ids.len() as u16).to_be_bytes());
            encode_atom(&r.node, out);
            out.extend_from_slice(&r.creation.to_be_bytes());
            ids.iter().for_each(|w| out.extend_from_slice(&w.to_be_bytes()));
        }
        Term::Fun(raw) => out.extend_from_slice(raw),
        Term::Export { module, function, arity } => {
            out.push(EXPORT_EXT);
            encode_atom(module, out);
            encode_atom(function, out);
            out.extend_from_slice(&[SMALL_INTEGER_EXT, *arity]);
        }
    }
}

/// A short Erlang-like rendering, for error messages (not `~p`: that is done by the node).
impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn seq(f: &mut fmt::Formatter<'_>, items: &[Term]) -> fmt::Result {
            for (i, t) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{t}")?;
            }
            Ok(())
        }
        match self {
            Term::Atom(a) => {
                let plain = a.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                    && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '@');
                if plain { f.write_str(a) } else { write!(f, "'{}'", a.replace('\\', "\\\\").replace('\'', "\\'")) }
            }
            Term::Int(i) => write!(f, "{i}"),
            Term::BigInt { negative, magnitude_le } => {
                write!(f, "{}16#", if *negative { "-" } else { "" })?;
                magnitude_le.iter().rev().try_for_each(|b| write!(f, "{b:02X}"))
            }
            Term::Float(x) => write!(f, "{x:?}"),
            Term::Binary(b) => match std::str::from_utf8(b) {
                Ok(s) if !s.chars().any(char::is_control) => write!(f, "<<{s:?}>>"),
                _ => write!(f, "<<{}>>", b.iter().map(u8::to_string).collect::<Vec<_>>().join(",")),
            },
            Term::BitBinary { bytes, bits } => write!(f, "<<{} bytes, last {bits} bits>>", bytes.len()),
            Term::Tuple(items) => {
                f.write_str("{")?;
                seq(f, items)?;
                f.write_str("}")
            }
            Term::Chars(b) => write!(f, "{:?}", String::from_utf8_lossy(b)),
            Term::List(items, tail) => {
                f.write_str("[")?;
                seq(f, items)?;
                if **tail != Term::Nil {
                    write!(f, "|{tail}")?;
                }
                f.write_str("]")
            }
            Term::Nil => f.write_str("[]"),
            Term::Map(pairs) => {
                f.write_str("#{")?;
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{k} => {v}")?;
                }
                f.write_str("}")
            }
            Term::Pid(p) => write!(f, "<{}.{}.{}>", p.node, p.id, p.serial),
            Term::Port { node, id, .. } => write!(f, "#Port<{node}.{id}>"),
            Term::Ref(r) => write!(f, "#Ref<{}.{}>", r.node, r.ids.iter().map(u32::to_string).collect::<Vec<_>>().join(".")),
            Term::Fun(_) => f.write_str("#Fun<>"),
            Term::Export { module, function, arity } => write!(f, "fun {module}:{function}/{arity}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// `term_to_binary({ok, <<"hi">>, [1,2,3], -5, 70000, 1.5, "ab", #{a => 1},
    /// 18446744073709551616, -300, self(), make_ref(), [a|b], {}, [], <<1:3>>,
    /// fun lists:map/2, 3.0e300})` on OTP 25.2.3 (atoms as ATOM_EXT, as term_to_binary does).
    const CAPTURED: &str = "8368126400026F6B6D0000000268696B000301020362FFFFFFFB6200011170463FF80000000000006B0002616274000000016400016161016E090000000000000000000162FFFFFED45864000D6E6F6E6F6465406E6F686F73740000000900000000000000005A000364000D6E6F6E6F6465406E6F686F737400000000000273AE32B8000127F567596C00000001640001616400016268006A4D000000010320716400056C697374736400036D61706102467E51EB2D66005835";

    #[test]
    fn decodes_a_captured_term() {
        let bytes = unhex(CAPTURED);
        let (t, used) = decode(&bytes, Limits::default()).unwrap();
        assert_eq!(used, bytes.len());
        let items = t.as_tuple().unwrap();
        assert_eq!(items.len(), 18);
        assert_eq!(items[0], Term::atom("ok"));
        assert_eq!(items[1], Term::Binary(b"hi".to_vec()));
        assert_eq!(items[2], Term::Chars(vec![1, 2, 3]));
        assert_eq!((&items[3], &items[4], &items[5]), (&Term::Int(-5), &Term::Int(70000), &Term::Float(1.5)));
        assert_eq!(items[7], Term::Map(vec![(Term::atom("a"), Term::Int(1))]));
        assert_eq!(items[8], Term::BigInt { negative: false, magnitude_le: vec![0, 0, 0, 0, 0, 0, 0, 0, 1] });
        assert_eq!(items[9], Term::Int(-300));
        assert!(matches!(&items[10], Term::Pid(p) if p.node == "nonode@nohost" && p.id == 9));
        assert!(matches!(&items[11], Term::Ref(r) if r.node == "nonode@nohost" && r.ids.len() == 3));
        assert_eq!(items[12], Term::List(vec![Term::atom("a")], Box::new(Term::atom("b"))));
        assert_eq!((&items[13], &items[14]), (&Term::Tuple(vec![]), &Term::Nil));
        assert_eq!(items[15], Term::BitBinary { bytes: vec![0x20], bits: 3 });
        assert_eq!(items[16], Term::Export { module: "lists".into(), function: "map".into(), arity: 2 });
        assert_eq!(items[17], Term::Float(3.0e300));
        // What we encode decodes to the same term.
        assert_eq!(decode(&encode(&t), Limits::default()).unwrap().0, t);
        assert_eq!(t.to_string().lines().count(), 1);
    }

    #[test]
    fn hostile_counts_depth_and_sizes_are_refused() {
        // A list claiming 4 billion elements in 10 bytes: refused before any allocation.
        assert_eq!(decode(&[131, LIST_EXT, 0xff, 0xff, 0xff, 0xff, NIL_EXT], Limits::default()), Err(EtfError::Truncated));
        assert_eq!(decode(&[131, LARGE_TUPLE_EXT, 0xff, 0xff, 0xff, 0xff], Limits::default()), Err(EtfError::Truncated));
        assert_eq!(decode(&[131, MAP_EXT, 0x80, 0, 0, 0], Limits::default()), Err(EtfError::Truncated));
        assert_eq!(decode(&[131, BINARY_EXT, 0xff, 0xff, 0xff, 0xff, 1], Limits::default()), Err(EtfError::Truncated));
        // Nesting: [[[[...]]]] deeper than the limit.
        let mut deep = vec![131];
        for _ in 0..200 {
            deep.extend_from_slice(&[LIST_EXT, 0, 0, 0, 1]);
        }
        assert_eq!(decode(&deep, Limits::default()), Err(EtfError::TooDeep(128)));
        let many = [&[131, SMALL_TUPLE_EXT, 5][..], &[NIL_EXT; 5]].concat();
        assert_eq!(decode(&many, Limits { max_depth: 8, max_terms: 3 }), Err(EtfError::TooMany(3)));
        // Compressed terms and atom cache references are not accepted.
        assert_eq!(decode(&[131, 80, 0, 0, 0, 1, 0], Limits::default()), Err(EtfError::BadTag(80)));
        assert_eq!(decode(&[131, 82, 0], Limits::default()), Err(EtfError::BadTag(82)));
        assert_eq!(decode(&[130, NIL_EXT], Limits::default()), Err(EtfError::BadVersion(130)));
        assert_eq!(decode(&[131, SMALL_ATOM_UTF8_EXT, 1, 0xff], Limits::default()), Err(EtfError::BadAtom));
        assert_eq!(decode(&[131, NEWER_REFERENCE_EXT, 0, 9], Limits::default()), Err(EtfError::BadReference(9)));
    }

    #[test]
    fn integers_pick_the_smallest_encoding_and_round_trip() {
        for i in [0i64, 255, 256, -1, i32::MIN as i64, i32::MAX as i64 + 1, i64::MIN, i64::MAX] {
            assert_eq!(decode(&encode(&Term::Int(i)), Limits::default()).unwrap().0, Term::Int(i), "{i}");
        }
        assert_eq!(encode(&Term::Int(7)), vec![131, SMALL_INTEGER_EXT, 7]);
    }

    fn term_strategy() -> impl Strategy<Value = Term> {
        let leaf = prop_oneof![
            "[a-z_@.]{0,12}".prop_map(Term::Atom),
            any::<i64>().prop_map(Term::Int),
            any::<f64>().prop_filter("NaN != NaN", |f| !f.is_nan()).prop_map(Term::Float),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(Term::Binary),
            proptest::collection::vec(any::<u8>(), 1..16).prop_map(Term::Chars),
            Just(Term::Nil),
            ("[a-z]{1,5}@[a-z]{1,5}", any::<u32>(), any::<u32>(), any::<u32>())
                .prop_map(|(node, id, serial, creation)| Term::Pid(Pid { node, id, serial, creation })),
            ("[a-z]{1,5}@[a-z]{1,5}", any::<u32>(), proptest::collection::vec(any::<u32>(), 1..=5))
                .prop_map(|(node, creation, ids)| Term::Ref(Reference { node, creation, ids })),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Term::Tuple),
                proptest::collection::vec(inner.clone(), 1..6).prop_map(Term::list),
                proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Term::Map),
            ]
        })
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = vec![131];
            b.extend_from_slice(&bytes);
            if let Ok((_, used)) = decode(&b, Limits::default()) {
                prop_assert!(used <= b.len());
            }
            let _ = decode(&bytes, Limits::default());
        }

        #[test]
        fn encode_then_decode_is_identity(t in term_strategy()) {
            let bytes = encode(&t);
            let (back, used) = decode(&bytes, Limits::default()).unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, t);
        }
    }
}
