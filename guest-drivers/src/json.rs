//! A tiny JSON writer (objects of strings, numbers and booleans) and `Report`, the fixed-size
//! field list a task fills in for its `RESULT {...}` line.

use core::fmt::{self, Write};

/// Writes one JSON object field by field; strings are escaped.
pub struct JsonObject<'w, W: Write> {
    out: &'w mut W,
    empty: bool,
}

impl<'w, W: Write> JsonObject<'w, W> {
    pub fn begin(out: &'w mut W) -> Result<Self, fmt::Error> {
        out.write_char('{')?;
        Ok(JsonObject { out, empty: true })
    }

    fn key(&mut self, key: &str) -> fmt::Result {
        if !self.empty {
            self.out.write_char(',')?;
        }
        self.empty = false;
        write_string(self.out, key)?;
        self.out.write_char(':')
    }

    pub fn str(&mut self, key: &str, value: &str) -> fmt::Result {
        self.key(key)?;
        write_string(self.out, value)
    }

    pub fn u64(&mut self, key: &str, value: u64) -> fmt::Result {
        self.key(key)?;
        write!(self.out, "{value}")
    }

    pub fn bool(&mut self, key: &str, value: bool) -> fmt::Result {
        self.key(key)?;
        self.out.write_str(if value { "true" } else { "false" })
    }

    pub fn raw(&mut self, key: &str, value: &str) -> fmt::Result {
        self.key(key)?;
        self.out.write_str(value)
    }

    pub fn end(self) -> fmt::Result {
        self.out.write_char('}')
    }
}

/// Writes `s` as a JSON string literal.
pub fn write_string<W: Write>(out: &mut W, s: &str) -> fmt::Result {
    out.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => out.write_str("\\\"")?,
            '\\' => out.write_str("\\\\")?,
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32)?,
            c => out.write_char(c)?,
        }
    }
    out.write_char('"')
}

/// A short owned string for report values built with `format_args!`; longer text is cut.
#[derive(Clone, Copy)]
pub struct SmallString {
    buf: [u8; 160],
    len: usize,
}

impl SmallString {
    pub fn new() -> Self {
        SmallString {
            buf: [0; 160],
            len: 0,
        }
    }

    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 characters are ever appended (see write_str).
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl Write for SmallString {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut utf8 = [0; 4];
            let bytes = c.encode_utf8(&mut utf8).as_bytes();
            if self.len + bytes.len() > self.buf.len() {
                break;
            }
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Value {
    U64(u64),
    Bool(bool),
    Str(SmallString),
    /// Written as is: a number with a fraction, or an array.
    Raw(SmallString),
}

const MAX_FIELDS: usize = 32;

/// Task-specific result fields, in the order they were added.
pub struct Report {
    fields: [Option<(&'static str, Value)>; MAX_FIELDS],
    len: usize,
}

impl Report {
    pub fn new() -> Self {
        Report {
            fields: [None; MAX_FIELDS],
            len: 0,
        }
    }

    fn push(&mut self, key: &'static str, value: Value) {
        // A later value for the same key replaces the earlier one; extra keys are dropped.
        if let Some(field) = self.fields[..self.len]
            .iter_mut()
            .flatten()
            .find(|f| f.0 == key)
        {
            field.1 = value;
        } else if self.len < MAX_FIELDS {
            self.fields[self.len] = Some((key, value));
            self.len += 1;
        }
    }

    pub fn u64(&mut self, key: &'static str, value: u64) {
        self.push(key, Value::U64(value));
    }

    pub fn bool(&mut self, key: &'static str, value: bool) {
        self.push(key, Value::Bool(value));
    }

    pub fn str(&mut self, key: &'static str, value: fmt::Arguments) {
        let mut s = SmallString::new();
        let _ = s.write_fmt(value);
        self.push(key, Value::Str(s));
    }

    /// A value written verbatim (the caller makes it valid JSON, e.g. `12.5` or `[1,2]`).
    pub fn raw(&mut self, key: &'static str, value: fmt::Arguments) {
        let mut s = SmallString::new();
        let _ = s.write_fmt(value);
        self.push(key, Value::Raw(s));
    }

    /// Appends the fields to an object being written.
    pub fn write_to<W: Write>(&self, obj: &mut JsonObject<W>) -> fmt::Result {
        for (key, value) in self.fields[..self.len].iter().flatten() {
            match value {
                Value::U64(v) => obj.u64(key, *v)?,
                Value::Bool(v) => obj.bool(key, *v)?,
                Value::Str(s) => obj.str(key, s.as_str())?,
                Value::Raw(s) => obj.raw(key, s.as_str())?,
            }
        }
        Ok(())
    }
}
