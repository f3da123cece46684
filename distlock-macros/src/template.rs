//! The key template: `"invoice:{invoice.id}"`, parsed into literal text and
//! placeholders. Pure string work, so the rules are unit-tested here; spans and
//! tokens are `expand.rs`'s business.

use std::fmt;

use crate::limits::MAX_KEY_LEN;

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    pub(crate) pieces: Vec<Piece>,
}

/// A run of literal text, or a placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Text copied into the key as is (`{{` and `}}` already unescaped).
    Literal(String),
    /// `{name.field.0}`: a parameter and the fields to follow from it.
    Placeholder(Placeholder),
}

/// `{name.field.0}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placeholder {
    /// The parameter (or `self`).
    pub(crate) name: String,
    /// Named fields or tuple indices, in order.
    pub(crate) fields: Vec<Field>,
}

/// One step after the parameter name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Field {
    Named(String),
    Index(u32),
}

/// Why a template was refused; the message is shown at the string literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TemplateError(pub(crate) String);

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn error(message: impl Into<String>) -> TemplateError {
    TemplateError(message.into())
}

impl Template {
    /// Parses `{name}`, `{name.field.sub}`, `{self.field}`, `{{` and `}}`.
    pub(crate) fn parse(template: &str) -> Result<Template, TemplateError> {
        if template.is_empty() {
            return Err(error(
                "the key template is empty: name the lock, like `key = \"invoice:{invoice.id}\"`",
            ));
        }
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = template.char_indices().peekable();
        while let Some((start, c)) = chars.next() {
            match c {
                '{' if chars.peek().is_some_and(|&(_, n)| n == '{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().is_some_and(|&(_, n)| n == '}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => {
                    return Err(error(
                        "unmatched `}` in the key template (write `}}` for a literal brace)",
                    ))
                }
                '{' => {
                    let Some(len) = template[start + 1..].find('}') else {
                        return Err(error(format!(
                            "unclosed `{{` in the key template: `{}` (write `{{{{` for a literal brace)",
                            &template[start..]
                        )));
                    };
                    let inner = &template[start + 1..start + 1 + len];
                    let placeholder = Placeholder::parse(inner)?;
                    while chars.peek().is_some_and(|&(i, _)| i <= start + 1 + len) {
                        chars.next();
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Placeholder(placeholder));
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Literal(text));
        }
        Ok(Template { pieces })
    }

    /// The placeholders, in order.
    pub(crate) fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Placeholder(p) => Some(p),
            Piece::Literal(_) => None,
        })
    }

    /// The `format!` string: literal text with braces escaped, `{}` for each
    /// placeholder.
    pub(crate) fn format_string(&self) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(&text.replace('{', "{{").replace('}', "}}")),
                Piece::Placeholder(_) => out.push_str("{}"),
            }
        }
        out
    }

    /// Refuses literal text that no value could make a valid key: the core
    /// rejects `{`, `}` and control characters, and keys over 1024 bytes.
    pub(crate) fn check_literal_text(&self) -> Result<(), TemplateError> {
        let mut len = 0;
        for piece in &self.pieces {
            let Piece::Literal(text) = piece else {
                continue;
            };
            len += text.len();
            if text.contains(['{', '}']) {
                return Err(error(
                    "a lock key cannot contain `{` or `}`: distlock reserves them for the \
                     Redis Cluster hash tag, so `{{` and `}}` would fail at every call",
                ));
            }
            if text.chars().any(char::is_control) {
                return Err(error("a lock key cannot contain control characters"));
            }
        }
        if len > MAX_KEY_LEN {
            return Err(error(format!(
                "the key template's literal text is {len} bytes: a lock key is at most {MAX_KEY_LEN}"
            )));
        }
        Ok(())
    }
}

impl Placeholder {
    fn parse(inner: &str) -> Result<Placeholder, TemplateError> {
        if inner.trim().is_empty() {
            return Err(error(
                "empty placeholder `{}` in the key template: name a parameter, like `{id}` \
                 (write `{{}}` for literal braces)",
            ));
        }
        let invalid = || {
            error(format!(
                "invalid placeholder `{{{inner}}}` in the key template: expected a parameter \
                 name and optional fields, like `{{user.id}}` or `{{self.shard}}`"
            ))
        };
        let mut segments = inner.split('.');
        let name = segments
            .next()
            .filter(|s| is_ident(s))
            .ok_or_else(invalid)?;
        let fields = segments
            .map(|s| {
                if is_ident(s) {
                    Ok(Field::Named(s.to_owned()))
                } else if is_index(s) {
                    s.parse().map(Field::Index).map_err(|_| invalid())
                } else {
                    Err(invalid())
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Placeholder {
            name: name.to_owned(),
            fields,
        })
    }

    /// `user.id`, for messages.
    pub(crate) fn display(&self) -> String {
        let mut out = self.name.clone();
        for field in &self.fields {
            out.push('.');
            match field {
                Field::Named(name) => out.push_str(name),
                Field::Index(i) => out.push_str(&i.to_string()),
            }
        }
        out
    }
}

/// An identifier as Rust writes one (keywords are left to the compiler, which
/// reports them at the string).
fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
        && chars.all(|c| c == '_' || c.is_alphanumeric())
        && s != "_"
}

/// A tuple index: digits without a leading zero.
fn is_index(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> Piece {
        Piece::Literal(s.to_owned())
    }

    fn ph(name: &str, fields: &[&str]) -> Piece {
        Piece::Placeholder(Placeholder {
            name: name.to_owned(),
            fields: fields
                .iter()
                .map(|f| match f.parse() {
                    Ok(i) => Field::Index(i),
                    Err(_) => Field::Named((*f).to_owned()),
                })
                .collect(),
        })
    }

    fn parse(s: &str) -> Vec<Piece> {
        Template::parse(s).unwrap().pieces
    }

    fn err(s: &str) -> String {
        Template::parse(s).unwrap_err().0
    }

    #[test]
    fn literal_text_is_one_piece() {
        assert_eq!(parse("report:daily"), [lit("report:daily")]);
    }

    #[test]
    fn placeholders_split_the_text() {
        assert_eq!(
            parse("invoice:{invoice.id}:{user}"),
            [
                lit("invoice:"),
                ph("invoice", &["id"]),
                lit(":"),
                ph("user", &[]),
            ]
        );
    }

    #[test]
    fn nested_fields_self_and_tuple_indices_parse() {
        assert_eq!(
            parse("{self.shard}/{pair.0}/{a.b.c}"),
            [
                ph("self", &["shard"]),
                lit("/"),
                ph("pair", &["0"]),
                lit("/"),
                ph("a", &["b", "c"]),
            ]
        );
    }

    #[test]
    fn non_ascii_names_and_text_parse() {
        assert_eq!(parse("clé:{número}"), [lit("clé:"), ph("número", &[])]);
    }

    #[test]
    fn doubled_braces_are_literal_braces() {
        assert_eq!(
            parse("a{{b}}c{x}}}"),
            [lit("a{b}c"), ph("x", &[]), lit("}")]
        );
    }

    #[test]
    fn format_string_escapes_braces_and_marks_placeholders() {
        let t = Template::parse("a{{b}}:{x.y}").unwrap();
        assert_eq!(t.format_string(), "a{{b}}:{}");
        assert_eq!(
            t.placeholders()
                .map(Placeholder::display)
                .collect::<Vec<_>>(),
            ["x.y"]
        );
    }

    #[test]
    fn empty_template_is_refused() {
        assert!(err("").contains("empty"));
    }

    #[test]
    fn unclosed_brace_is_refused() {
        assert!(err("invoice:{id").contains("unclosed `{`"));
        assert!(err("{").contains("unclosed `{`"));
    }

    #[test]
    fn unmatched_closing_brace_is_refused() {
        assert!(err("invoice}").contains("unmatched `}`"));
    }

    #[test]
    fn empty_placeholder_is_refused() {
        assert!(err("invoice:{}").contains("empty placeholder"));
        assert!(err("invoice:{ }").contains("empty placeholder"));
    }

    #[test]
    fn malformed_placeholders_are_refused() {
        for bad in [
            "{a:?}", "{a b}", "{1a}", "{a.}", "{.a}", "{a..b}", "{a.01}", "{_}", "{a-b}", "{a{b}",
        ] {
            assert!(
                err(bad).contains("invalid placeholder"),
                "{bad}: {}",
                err(bad)
            );
        }
    }

    #[test]
    fn literal_braces_cannot_make_a_valid_key() {
        let t = Template::parse("a{{b").unwrap();
        assert!(t.check_literal_text().unwrap_err().0.contains("hash tag"));
    }

    #[test]
    fn control_characters_and_oversized_text_are_refused() {
        let t = Template::parse("a\nb").unwrap();
        assert!(t.check_literal_text().unwrap_err().0.contains("control"));
        let t = Template::parse(&"k".repeat(1025)).unwrap();
        assert!(t.check_literal_text().unwrap_err().0.contains("1024"));
        let t = Template::parse(&format!("{}{{id}}", "k".repeat(1000))).unwrap();
        assert!(t.check_literal_text().is_ok());
    }
}

/// Property tests: any input parses or is refused without panicking, and a
/// template written from pieces parses back into those pieces.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn ident() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z_][a-zA-Z0-9_]{0,8}",
            Just("número".to_owned()),
            Just("self".to_owned()),
        ]
        .prop_filter("`_` alone is not a name", |s| s != "_")
    }

    fn field() -> impl Strategy<Value = Field> {
        prop_oneof![
            ident().prop_map(Field::Named),
            any::<u32>().prop_map(Field::Index),
        ]
    }

    fn piece() -> impl Strategy<Value = Piece> {
        prop_oneof![
            "[a-z:{}/é🔒 \\t]{1,8}".prop_map(Piece::Literal),
            (ident(), prop::collection::vec(field(), 0..3))
                .prop_map(|(name, fields)| Piece::Placeholder(Placeholder { name, fields })),
        ]
    }

    /// Adjacent literal runs are one piece once parsed.
    fn normalize(pieces: Vec<Piece>) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for p in pieces {
            match (out.last_mut(), p) {
                (Some(Piece::Literal(prev)), Piece::Literal(text)) => prev.push_str(&text),
                (_, p) => out.push(p),
            }
        }
        out
    }

    /// The template text that means `pieces`.
    fn write(pieces: &[Piece]) -> String {
        pieces
            .iter()
            .map(|p| match p {
                Piece::Literal(text) => text.replace('{', "{{").replace('}', "}}"),
                Piece::Placeholder(ph) => format!("{{{}}}", ph.display()),
            })
            .collect()
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panicking(text in "\\PC{0,40}|[{}a.0 ]{0,12}") {
            if let Ok(t) = Template::parse(&text) {
                // What parsed writes back to a template that parses the same.
                let again = Template::parse(&write(&t.pieces)).unwrap();
                prop_assert_eq!(again, t.clone());
                let _ = t.check_literal_text();
            }
        }

        #[test]
        fn a_template_written_from_pieces_parses_back_into_them(
            pieces in prop::collection::vec(piece(), 1..6),
        ) {
            let pieces = normalize(pieces);
            let text = write(&pieces);
            let parsed = Template::parse(&text).unwrap();
            prop_assert_eq!(&parsed.pieces, &pieces);
            // One `{}` per placeholder, literal braces escaped.
            let expected: String = pieces
                .iter()
                .map(|p| match p {
                    Piece::Literal(t) => t.replace('{', "{{").replace('}', "}}"),
                    Piece::Placeholder(_) => "{}".to_owned(),
                })
                .collect();
            prop_assert_eq!(parsed.format_string(), expected);
            let names: Vec<String> = parsed.placeholders().map(Placeholder::display).collect();
            let wanted: Vec<String> = pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Placeholder(ph) => Some(ph.display()),
                    Piece::Literal(_) => None,
                })
                .collect();
            prop_assert_eq!(names, wanted);
            // The literal text is refused exactly when no value could make a
            // valid key of it.
            let literal: String = pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Literal(t) => Some(t.as_str()),
                    Piece::Placeholder(_) => None,
                })
                .collect();
            let hopeless = literal.contains(['{', '}'])
                || literal.chars().any(char::is_control)
                || literal.len() > MAX_KEY_LEN;
            prop_assert_eq!(parsed.check_literal_text().is_err(), hopeless);
        }
    }
}
