//! Where an error is in a TOML file: the key paths, lines and columns that
//! the policy file's and the gateway configuration's errors report.
//!
//! Both files are refused with the same kind of message (`line 3, column
//! 12: `models."gpt-4.1".jitter` ...`), so both locate and render their
//! paths here: a byte offset becomes a 1-based line and column, a key path
//! becomes the span of the value written at it, an offset becomes the key
//! path written around it, and a key path is quoted the way TOML writes it.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step of a key path: a table's key or an array's index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    pub fn key(k: &str) -> Seg {
        Seg::Key(k.to_owned())
    }
}

/// 1-based line and column of a byte offset; the column counts characters,
/// not bytes. An offset past the end is the end.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit_once('\n')
        .map_or(before, |(_, tail)| tail)
        .chars()
        .count()
        + 1;
    (line, col)
}

/// The byte span of the value written at `path`, if the text parses as
/// TOML and sets it.
pub fn span_of(text: &str, path: &[Seg]) -> Option<Range<usize>> {
    let root = DeTable::parse(text).ok()?;
    let (Seg::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let mut value = root.get_ref().get(first.as_str())?;
    for seg in rest {
        value = match seg {
            Seg::Key(k) => value.get_ref().as_table()?.get(k.as_str())?,
            Seg::Index(i) => value.get_ref().as_array()?.get(*i)?,
        };
    }
    Some(value.span())
}

/// Line and column of the value written at `path`, if it is.
pub fn locate(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    span_of(text, path).map(|span| line_col(text, span.start))
}

/// The path of the innermost key or value written at byte `offset` (where
/// the TOML deserializer located a wrong type or an unknown key), if the
/// text parses as TOML and something is written there.
pub fn path_at(text: &str, offset: usize) -> Option<Vec<Seg>> {
    fn walk_table(table: &DeTable<'_>, offset: usize, path: &mut Vec<Seg>) -> bool {
        for (k, v) in table.iter() {
            path.push(Seg::Key(k.get_ref().to_string()));
            if walk_value(v.get_ref(), offset, path)
                || k.span().contains(&offset)
                || v.span().contains(&offset)
            {
                return true;
            }
            path.pop();
        }
        false
    }
    fn walk_value(value: &DeValue<'_>, offset: usize, path: &mut Vec<Seg>) -> bool {
        if let Some(table) = value.as_table() {
            return walk_table(table, offset, path);
        }
        let items: &[Spanned<DeValue<'_>>] = value.as_array().map_or(&[], |a| &a[..]);
        for (i, v) in items.iter().enumerate() {
            path.push(Seg::Index(i));
            if walk_value(v.get_ref(), offset, path) || v.span().contains(&offset) {
                return true;
            }
            path.pop();
        }
        false
    }
    let root = DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    walk_table(root.get_ref(), offset, &mut path).then_some(path)
}

/// Renders a key path the way TOML writes it: bare keys as they are,
/// anything else quoted and escaped, indices as `[i]`
/// (`models[1].providers`, `providers."a b".base_url`). A model name (the
/// key right under a top-level `models` table) is always quoted: model
/// names are full of dots and slashes, and one form is easier to read.
pub fn display_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for (i, seg) in path.iter().enumerate() {
        let k = match seg {
            Seg::Index(n) => {
                out.push_str(&format!("[{n}]"));
                continue;
            }
            Seg::Key(k) => k,
        };
        if i > 0 {
            out.push('.');
        }
        let bare = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let is_model = i == 1 && matches!(path.first(), Some(Seg::Key(m)) if m == "models");
        if bare && !is_model {
            out.push_str(k);
            continue;
        }
        out.push('"');
        for c in k.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(keys: &[&str]) -> Vec<Seg> {
        keys.iter().map(|k| Seg::key(k)).collect()
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
        assert_eq!(line_col("", 0), (1, 1));
    }

    #[test]
    fn the_last_line_needs_no_newline() {
        let text = "a = 1\nb = 2";
        assert_eq!(line_col(text, text.len()), (2, 6));
        assert_eq!(locate(text, &keys(&["b"])), Some((2, 5)));
        assert_eq!(path_at(text, text.len() - 1), Some(keys(&["b"])));
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let text = "name = \"héllo\" # ü\nx = \"€€\"\ny = 1\n";
        let euro = text.find('€').unwrap();
        assert_eq!(line_col(text, euro), (2, 6));
        let after = euro + '€'.len_utf8() * 2;
        assert_eq!(line_col(text, after), (2, 8));
        let text = "\"ключ\" = 1\nz = 2\n";
        assert_eq!(locate(text, &keys(&["ключ"])), Some((1, 10)));
        assert_eq!(locate(text, &keys(&["z"])), Some((2, 5)));
    }

    #[test]
    fn nested_paths() {
        let text = "[budget]\nratio = 0.5\n[models.small.budget]\nratio = 2.0\n";
        let path = keys(&["models", "small", "budget", "ratio"]);
        assert_eq!(locate(text, &path), Some((4, 9)));
        assert_eq!(path_at(text, text.rfind('2').unwrap()), Some(path.clone()));
        assert_eq!(display_path(&path), "models.\"small\".budget.ratio");
        assert_eq!(locate(text, &keys(&["budget", "ratio"])), Some((2, 9)));
        assert_eq!(locate(text, &keys(&["budget", "missing"])), None);
        assert_eq!(locate(text, &[]), None);
        assert_eq!(locate("not = toml = at all", &keys(&["not"])), None);
        assert_eq!(path_at("not = toml = at all", 1), None);
        assert_eq!(path_at(text, 0), Some(keys(&["budget"])), "the header");
    }

    #[test]
    fn quoted_keys_with_dots() {
        let text = "[models.\"gpt-4.1\"]\njitter = 0.3\n";
        let path = keys(&["models", "gpt-4.1", "jitter"]);
        assert_eq!(locate(text, &path), Some((2, 10)));
        assert_eq!(path_at(text, text.find('3').unwrap()), Some(path.clone()));
        assert_eq!(display_path(&path), "models.\"gpt-4.1\".jitter");
        assert_eq!(locate(text, &keys(&["models", "gpt-4", "1"])), None);
        assert_eq!(
            display_path(&keys(&["providers", "a b", "base_url"])),
            "providers.\"a b\".base_url"
        );
    }

    #[test]
    fn array_indices() {
        let text = "[[models]]\nname = \"m\"\nproviders = [\"a\", \"zz\"]\n\
                    [[models]]\nname = \"n\"\n";
        let path = vec![
            Seg::key("models"),
            Seg::Index(0),
            Seg::key("providers"),
            Seg::Index(1),
        ];
        assert_eq!(locate(text, &path), Some((3, 19)));
        assert_eq!(path_at(text, text.find("zz").unwrap()), Some(path.clone()));
        assert_eq!(display_path(&path), "models[0].providers[1]");
        let name = vec![Seg::key("models"), Seg::Index(1), Seg::key("name")];
        assert_eq!(locate(text, &name), Some((5, 8)));
        assert_eq!(path_at(text, text.find("\"n\"").unwrap()), Some(name));
        assert_eq!(locate(text, &[Seg::key("models"), Seg::Index(2)]), None);
        assert_eq!(locate(text, &[Seg::key("models"), Seg::key("name")]), None);
    }

    #[test]
    fn paths_quote_what_toml_would_quote() {
        assert_eq!(display_path(&keys(&["budget", "ratio"])), "budget.ratio");
        assert_eq!(
            display_path(&keys(&["models", "small"])),
            "models.\"small\""
        );
        assert_eq!(
            display_path(&keys(&["models", "a\"b\\c"])),
            "models.\"a\\\"b\\\\c\""
        );
        assert_eq!(
            display_path(&keys(&["a.b", "\u{7}"])),
            "\"a.b\".\"\\u0007\""
        );
        assert_eq!(display_path(&keys(&["", "x"])), "\"\".x");
    }
}
