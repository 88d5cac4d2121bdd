//! A small SQL lexer: enough of Postgres' lexical rules to split a query
//! string into statements and see its keywords and function calls, without
//! being fooled by comments, string literals, quoted identifiers or
//! dollar-quoted bodies.
//!
//! It never decides anything on its own: `classify` uses its tokens for a
//! fast answer on the common shapes and asks the real grammar otherwise.

/// One token of interest. Literals and operators carry no text: the
/// classifier only looks at words, parentheses and statement ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    /// An unquoted word (keyword or identifier), as written.
    Word(&'a str),
    /// A double-quoted identifier, without its quotes (`""` not undone).
    Quoted(&'a str),
    Open,
    Close,
    /// `;` at any depth.
    Semicolon,
    /// A string, number or parameter.
    Literal,
    /// An operator or other punctuation character.
    Other(u8),
}

/// The lexer failed to make sense of the text (an unterminated literal or
/// comment): the caller falls back to the parser, which will say why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unclear;

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// Tokenizes `sql`, calling `f` for each token with its byte offset.
pub fn tokens<'a>(sql: &'a str, mut f: impl FnMut(Token<'a>, usize)) -> Result<(), Unclear> {
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // Block comments nest in Postgres.
                let mut depth = 0usize;
                loop {
                    if i + 1 >= b.len() {
                        return Err(Unclear);
                    }
                    if b[i] == b'/' && b[i + 1] == b'*' {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b[i + 1] == b'/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                i = skip_string(b, i + 1, false)?;
                f(Token::Literal, i);
            }
            b'"' => {
                let start = i + 1;
                i = start;
                loop {
                    match b.get(i) {
                        None => return Err(Unclear),
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => break,
                        Some(_) => i += 1,
                    }
                }
                f(Token::Quoted(&sql[start..i]), start);
                i += 1;
            }
            b'$' => {
                // `$1` is a parameter; `$tag$` or `$$` opens a dollar quote.
                if b.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    f(Token::Literal, i);
                    continue;
                }
                let mut j = i + 1;
                while j < b.len() && is_ident_char(b[j]) && b[j] != b'$' {
                    j += 1;
                }
                if b.get(j) != Some(&b'$') {
                    return Err(Unclear);
                }
                let tag = &b[i..=j];
                let body = j + 1;
                let end = find(&b[body..], tag).ok_or(Unclear)?;
                i = body + end + tag.len();
                f(Token::Literal, i);
            }
            b'(' => {
                f(Token::Open, i);
                i += 1;
            }
            b')' => {
                f(Token::Close, i);
                i += 1;
            }
            b';' => {
                f(Token::Semicolon, i);
                i += 1;
            }
            _ if is_ident_start(c) => {
                let start = i;
                while i < b.len() && is_ident_char(b[i]) {
                    i += 1;
                }
                let word = &sql[start..i];
                // E'..', B'..', X'..', N'..' and U&'..' are strings, with
                // backslash escapes in E'..'.
                if b.get(i) == Some(&b'\'') && word.len() == 1 {
                    let escapes = word.eq_ignore_ascii_case("e");
                    i = skip_string(b, i + 1, escapes)?;
                    f(Token::Literal, i);
                } else if word.eq_ignore_ascii_case("u")
                    && b.get(i) == Some(&b'&')
                    && matches!(b.get(i + 1), Some(b'\'') | Some(b'"'))
                {
                    i += 1; // the quote is lexed next, as a string or identifier
                } else {
                    f(Token::Word(word), start);
                }
            }
            b'0'..=b'9' => {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_')
                {
                    i += 1;
                }
                f(Token::Literal, i);
            }
            _ => {
                f(Token::Other(c), i);
                i += 1;
            }
        }
    }
    Ok(())
}

/// Skips a quoted string starting after its opening quote; returns the index
/// after the closing quote. Adjacent `''` is an escaped quote.
fn skip_string(b: &[u8], mut i: usize, backslash: bool) -> Result<usize, Unclear> {
    loop {
        match b.get(i) {
            None => return Err(Unclear),
            Some(b'\\') if backslash => i += 2,
            Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
            Some(b'\'') => return Ok(i + 1),
            Some(_) => i += 1,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A key equal for statements that differ only in literals, parameters,
/// comments, case and white space: a cheap stand-in for a fingerprint, to
/// cache per-statement analysis. `None` when the lexer is unsure.
pub fn shape_key(sql: &str) -> Option<String> {
    let mut key = String::with_capacity(sql.len());
    tokens(sql, |t, _| match t {
        Token::Word(w) => {
            key.push(' ');
            key.extend(w.chars().map(|c| c.to_ascii_lowercase()));
        }
        Token::Quoted(q) => {
            key.push_str(" \"");
            key.push_str(q);
            key.push('"');
        }
        Token::Open => key.push('('),
        Token::Close => key.push(')'),
        Token::Semicolon => key.push(';'),
        Token::Literal => key.push('?'),
        Token::Other(c) => key.push(c as char),
    })
    .ok()?;
    Some(key)
}

/// Splits a query string into its statements (byte ranges, trimmed of the
/// `;`). Empty statements are dropped, as Postgres drops them.
pub fn split(sql: &str) -> Result<Vec<&str>, Unclear> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut depth = 0i32;
    let mut saw_token = false;
    tokens(sql, |t, at| match t {
        Token::Open => {
            depth += 1;
            saw_token = true;
        }
        Token::Close => {
            depth -= 1;
            saw_token = true;
        }
        Token::Semicolon if depth <= 0 => {
            if saw_token {
                out.push(sql[start..at].trim());
            }
            start = at + 1;
            saw_token = false;
        }
        _ => saw_token = true,
    })?;
    if saw_token {
        out.push(sql[start..].trim());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> Vec<String> {
        let mut v = Vec::new();
        tokens(sql, |t, _| match t {
            Token::Word(w) => v.push(w.to_ascii_lowercase()),
            Token::Quoted(q) => v.push(format!("\"{q}\"")),
            Token::Open => v.push("(".into()),
            Token::Close => v.push(")".into()),
            Token::Semicolon => v.push(";".into()),
            Token::Literal | Token::Other(_) => {}
        })
        .unwrap();
        v
    }

    #[test]
    fn comments_strings_and_dollar_quotes_hide_their_contents() {
        assert_eq!(
            words("select /* insert /* nested */ delete */ 'update '' x' -- drop\n from t"),
            ["select", "from", "t"]
        );
        assert_eq!(
            words("select $$ insert into t $$, $f$ a $$ b $f$, $1 from \"Update\""),
            ["select", ",", ",", "from", "\"Update\""]
                .iter()
                .filter(|w| **w != ",")
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            words(r"select E'it\'s; delete' from t"),
            ["select", "from", "t"]
        );
        assert_eq!(words("select a$b from t"), ["select", "a$b", "from", "t"]);
        assert_eq!(tokens("select 'open", |_, _| {}), Err(Unclear));
        assert_eq!(tokens("select /* open", |_, _| {}), Err(Unclear));
        assert_eq!(tokens("select $x$ open", |_, _| {}), Err(Unclear));
    }

    #[test]
    fn shape_key_ignores_literals_but_not_operators() {
        assert_eq!(
            shape_key("UPDATE t SET v = v + 5 WHERE id = 7"),
            shape_key("update t  set v = v + 3 where id = $1 -- x")
        );
        assert_ne!(
            shape_key("SELECT a FROM t WHERE a = 1"),
            shape_key("SELECT a FROM t WHERE a > 1")
        );
        assert_ne!(
            shape_key("SELECT a FROM t"),
            shape_key("SELECT a FROM \"T\"")
        );
    }

    #[test]
    fn split_respects_quotes_and_parentheses() {
        assert_eq!(
            split("begin; insert into t values (';'); ; commit").unwrap(),
            ["begin", "insert into t values (';')", "commit"]
        );
        assert_eq!(
            split("do $$ begin perform 1; end $$; select 1;").unwrap(),
            ["do $$ begin perform 1; end $$", "select 1"]
        );
        assert!(split("  ;; -- nothing\n").unwrap().is_empty());
    }
}
