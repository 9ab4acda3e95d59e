//! Positions in TOML files: a file's text, kept to turn byte spans and key paths into
//! `file:line:column: key`, so an error in the agent's configuration or in a profile names the
//! place to fix.
//!
//! The `toml` parser's errors carry byte spans; `SourceText::toml_error` turns one into a
//! [`Location`] with the dotted key path it is about (`bus[rs485].device[fm1].unit`, array
//! elements labelled by their `name` or `id`). Checks that run after parsing name a key path
//! instead (`SourceText::locate`), and get the line it is written on, or the deepest part of
//! it that is written when a default applies.
//!
//! The lowest layer of the configuration: `profile` (profile files) and `config` (the agent's
//! file) both use it; it uses neither.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The text of a TOML file, kept to turn byte spans and key paths into `file:line:column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceText {
    path: PathBuf,
    text: String,
}

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

impl SourceText {
    /// `path` is what errors call the file.
    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        SourceText {
            path: path.into(),
            text: text.into(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(&self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    fn at_span(&self, span: Option<Range<usize>>, key: String) -> Location {
        let (line, column) = match span {
            Some(s) => {
                let (l, c) = self.line_col(s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        Location {
            file: self.path.clone(),
            line,
            column,
            key,
        }
    }

    /// Position and message of a `toml` deserialization error, with the key it is about.
    pub(crate) fn toml_error(&self, e: &toml::de::Error) -> (Location, String) {
        let message = e.message().trim().to_string();
        // An empty span is the document root (a missing top-level key).
        let mut key = e
            .span()
            .filter(|s| !s.is_empty())
            .map(|s| self.key_at(s.start))
            .unwrap_or_default();
        // A missing key is reported at its table's header: name the key itself.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            key = if key.is_empty() {
                field.to_string()
            } else {
                format!("{key}.{field}")
            };
        }
        (self.at_span(e.span(), key), message)
    }

    /// Where a key path is written; when the last keys are absent (a default applies), the
    /// deepest part that is written.
    pub(crate) fn locate(&self, path: &[Seg<'_>], key: String) -> Location {
        self.at_span(self.span_of(path), key)
    }

    /// [`SourceText::locate`] for a path of table keys, displayed joined by dots.
    pub(crate) fn locate_keys(&self, keys: &[&str]) -> Location {
        let segs: Vec<Seg<'_>> = keys.iter().map(|k| Seg::Key(k)).collect();
        self.locate(&segs, keys.join("."))
    }

    fn span_of(&self, path: &[Seg<'_>]) -> Option<Range<usize>> {
        use toml::de::{DeTable, DeValue};
        let root = DeTable::parse(&self.text).ok()?;
        let mut best = None;
        let mut table = Some(root.get_ref());
        let mut array: Option<&[toml::Spanned<DeValue<'_>>]> = None;
        for seg in path {
            let value = match (seg, table, array) {
                (Seg::Key(k), Some(t), _) => t.get_key_value(*k).map(|(key, v)| {
                    best = Some(key.span());
                    v
                }),
                (Seg::Index(i), _, Some(a)) => a.get(*i).inspect(|v| best = Some(v.span())),
                _ => None,
            };
            let Some(value) = value else { break };
            table = value.get_ref().as_table();
            array = value.get_ref().as_array().map(|a| &a[..]);
        }
        best
    }

    /// The dotted key path (`bus[rs485].device[fm1].unit`) of the deepest key or value that
    /// covers `offset`; array elements are labelled by their `name` or `id`, else their index.
    fn key_at(&self, offset: usize) -> String {
        use toml::de::{DeTable, DeValue};
        fn covers(span: Range<usize>, offset: usize) -> bool {
            span.start <= offset && offset < span.end.max(span.start + 1)
        }
        fn label(v: &DeValue<'_>, i: usize) -> String {
            v.as_table()
                .and_then(|t| t.get("name").or_else(|| t.get("id")))
                .and_then(|n| n.get_ref().as_str())
                .map_or_else(|| i.to_string(), str::to_string)
        }
        fn walk(t: &DeTable<'_>, offset: usize, prefix: &[String], best: &mut Vec<String>) {
            for (k, v) in t.iter() {
                let mut path = prefix.to_vec();
                path.push(k.get_ref().to_string());
                if (covers(k.span(), offset) || covers(v.span(), offset)) && path.len() > best.len()
                {
                    *best = path.clone();
                }
                match v.get_ref() {
                    DeValue::Table(inner) => walk(inner, offset, &path, best),
                    DeValue::Array(items) => {
                        for (i, item) in items.iter().enumerate() {
                            let mut p = prefix.to_vec();
                            p.push(format!("{}[{}]", k.get_ref(), label(item.get_ref(), i)));
                            if covers(item.span(), offset) && p.len() >= best.len() {
                                *best = p.clone();
                            }
                            if let DeValue::Table(inner) = item.get_ref() {
                                walk(inner, offset, &p, best);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        let Ok(root) = DeTable::parse(&self.text) else {
            return String::new();
        };
        let mut best = Vec::new();
        walk(root.get_ref(), offset, &[], &mut best);
        best.join(".")
    }
}

/// Where a problem is: file, line and column when known, and the key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based; `None` when the value is not written in the file (a default, the environment).
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key path, e.g. `bus[rs485].device[fm1].period_s`.
    pub key: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        Ok(())
    }
}
