//! The one shape of shell command the hook rewrites, read with certainty:
//!
//! ```text
//! [cd DIR &&] [NAME=VALUE ...] PROGRAM [ARG ...]
//! ```
//!
//! Words may be bare, single-quoted, double-quoted (without `$`, backquotes, `\` or `!`
//! inside) or backslash-escaped. Anything whose meaning depends on the shell's state or
//! does more than run one program -- expansions, globs, pipes, redirections, lists,
//! subshells, comments, newlines -- is [`NotCertain`], and the caller leaves the command
//! alone. Reading less than bash does is safe; reading it differently never is.
//!
//! Whitespace is what bash says it is: only spaces and tabs separate words, and newlines
//! end the command. A carriage return, a no-break space or any other character that
//! Unicode calls whitespace is part of a word to bash (`cargo test\r` runs a program
//! named `cargo-test\r`), so outside quotes it is [`NotCertain`], wherever it is.

use std::borrow::Cow;

/// A command of the accepted shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimpleCommand {
    /// `DIR` of a leading `cd DIR &&`.
    pub cd: Option<String>,
    /// Leading `NAME=VALUE` assignments: the program's extra environment.
    pub env: Vec<(String, String)>,
    /// The program and its arguments, quotes removed.
    pub argv: Vec<String>,
}

/// The command is not of the accepted shape, or not certainly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotCertain;

/// One word with its quotes removed. `assignment` is where its `=` is when the word starts
/// with an unquoted `NAME=`, which makes it an assignment in command position.
#[derive(Debug)]
struct Word {
    text: String,
    assignment: Option<usize>,
}

/// Characters that mean nothing to the shell outside quotes.
fn is_plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_-./=:,+@%^".contains(c) || (!c.is_ascii() && !c.is_whitespace())
}

fn is_name_char(c: char, first: bool) -> bool {
    c == '_' || c.is_ascii_alphabetic() || (!first && c.is_ascii_digit())
}

/// Reads words separated by blanks until the end or an operator (`&`, `|`, `;`, `<`, `>`,
/// `(`, `)`), which is left unread. Any other special character is [`NotCertain`].
fn words(input: &str) -> Result<(Vec<Word>, &str), NotCertain> {
    let mut words = Vec::new();
    let mut chars = input.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| *c == ' ' || *c == '\t').is_some() {}
        let Some(&(start, first)) = chars.peek() else {
            return Ok((words, ""));
        };
        if "&|;<>()".contains(first) {
            return Ok((words, &input[start..]));
        }
        let mut word = Word {
            text: String::new(),
            assignment: None,
        };
        // Whether everything so far was an unquoted name, so a `=` now makes an assignment.
        let mut name_so_far = true;
        while let Some(&(_, c)) = chars.peek() {
            if c == ' ' || c == '\t' || "&|;<>()".contains(c) {
                break;
            }
            chars.next();
            match c {
                '\'' => {
                    name_so_far = false;
                    loop {
                        match chars.next() {
                            Some((_, '\'')) => break,
                            Some((_, inner)) => word.text.push(inner),
                            None => return Err(NotCertain),
                        }
                    }
                }
                '"' => {
                    name_so_far = false;
                    loop {
                        match chars.next() {
                            Some((_, '"')) => break,
                            Some((_, '$' | '`' | '\\' | '!')) | None => return Err(NotCertain),
                            Some((_, inner)) => word.text.push(inner),
                        }
                    }
                }
                '\\' => {
                    name_so_far = false;
                    match chars.next() {
                        Some((_, '\n')) | None => return Err(NotCertain),
                        Some((_, escaped)) => word.text.push(escaped),
                    }
                }
                '=' if name_so_far && !word.text.is_empty() && word.assignment.is_none() => {
                    word.assignment = Some(word.text.len());
                    word.text.push('=');
                }
                c if is_plain(c) => {
                    if word.assignment.is_none() {
                        name_so_far &= is_name_char(c, word.text.is_empty());
                    }
                    word.text.push(c);
                }
                _ => return Err(NotCertain),
            }
        }
        words.push(word);
    }
}

/// Reads `command` as [`SimpleCommand`]; see the module documentation.
pub fn parse(command: &str) -> Result<SimpleCommand, NotCertain> {
    let (mut segment, rest) = words(command.trim_matches([' ', '\t', '\n']))?;
    let mut cd = None;
    if let Some(after_and) = rest.strip_prefix("&&") {
        let is_cd = segment.len() == 2
            && segment[0].assignment.is_none()
            && segment[0].text == "cd"
            && segment[1].assignment.is_none()
            && !segment[1].text.is_empty()
            && !segment[1].text.starts_with('-');
        if !is_cd {
            return Err(NotCertain);
        }
        cd = segment.pop().map(|dir| dir.text);
        let (command_words, rest) = words(after_and)?;
        if !rest.is_empty() {
            return Err(NotCertain);
        }
        segment = command_words;
    } else if !rest.is_empty() {
        return Err(NotCertain);
    }
    let program_at = segment
        .iter()
        .position(|word| word.assignment.is_none())
        .ok_or(NotCertain)?;
    let env = segment[..program_at]
        .iter()
        .filter_map(|word| {
            let at = word.assignment?;
            Some((word.text[..at].to_owned(), word.text[at + 1..].to_owned()))
        })
        .collect();
    let argv = segment
        .into_iter()
        .skip(program_at)
        .map(|word| word.text)
        .collect();
    Ok(SimpleCommand { cd, env, argv })
}

/// `word` as bash reads it back as exactly one word: bare when nothing in it is special,
/// else single-quoted.
pub fn quote(word: &str) -> Cow<'_, str> {
    let bare = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:,+@%".contains(c));
    // `=` stays quoted: a first word `NAME=...` would be an assignment.
    if bare {
        Cow::Borrowed(word)
    } else {
        Cow::Owned(format!("'{}'", word.replace('\'', r"'\''")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(command: &str) -> Vec<String> {
        parse(command).expect("certain").argv
    }

    #[test]
    fn plain_words_quotes_and_escapes_are_read_as_bash_reads_them() {
        assert_eq!(argv("cargo test"), ["cargo", "test"]);
        assert_eq!(
            argv("  cargo\ttest  -p app \n"),
            ["cargo", "test", "-p", "app"]
        );
        assert_eq!(
            argv(r#"cargo test 'a b' "c d" e\ f"#),
            ["cargo", "test", "a b", "c d", "e f"]
        );
        assert_eq!(argv("cargo test -- ''"), ["cargo", "test", "--", ""]);
        assert_eq!(argv("cargo test a'b'\"c\""), ["cargo", "test", "abc"]);
        assert_eq!(
            argv("cargo test --features=a,b"),
            ["cargo", "test", "--features=a,b"]
        );
        assert_eq!(
            argv("cargo test 'with $dollar'"),
            ["cargo", "test", "with $dollar"]
        );
    }

    #[test]
    fn leading_assignments_are_environment_and_later_ones_are_arguments() {
        let command =
            parse("RUST_BACKTRACE=1 RUSTFLAGS='-D warnings' cargo test X=1").expect("certain");
        assert_eq!(
            command.env,
            [
                ("RUST_BACKTRACE".to_owned(), "1".to_owned()),
                ("RUSTFLAGS".to_owned(), "-D warnings".to_owned())
            ]
        );
        assert_eq!(command.argv, ["cargo", "test", "X=1"]);
        // A quoted name is no assignment: bash runs a program called `A=1`.
        assert_eq!(parse("'A'=1 cargo").expect("certain").argv[0], "A=1");
    }

    #[test]
    fn a_leading_cd_is_kept_apart() {
        let command = parse("cd 'crates/my app' && cargo check").expect("certain");
        assert_eq!(command.cd.as_deref(), Some("crates/my app"));
        assert_eq!(command.argv, ["cargo", "check"]);
        assert_eq!(
            parse("cd a&&cargo check").expect("certain").cd.as_deref(),
            Some("a")
        );
    }

    #[test]
    fn anything_else_is_not_certain() {
        for command in [
            "",
            "cargo test | tail",
            "cargo test 2>&1",
            "cargo test > out",
            "cargo test; ls",
            "cargo test && cargo clippy",
            "cargo test || true",
            "cargo test &",
            "(cargo test)",
            "cargo test $FILTER",
            "cargo test \"$FILTER\"",
            "cargo test `x`",
            "cargo test *",
            "cargo test a?",
            "cargo test [ab]",
            "cargo test {a,b}",
            "cargo test ~/x",
            "cargo test # comment",
            "cargo test !x",
            "cargo test\ncargo build",
            "cargo test 'unterminated",
            "cargo test \"unterminated",
            "cargo test trailing\\",
            "cd && cargo test",
            "cd - && cargo test",
            "cd a b && cargo test",
            "X=1 cd a && cargo test",
            "cd a && cargo test && cd b",
            "ls && cargo test",
            "A=1 B=2",
        ] {
            assert_eq!(
                parse(command).map(|c| c.argv),
                Err(NotCertain),
                "{command:?}"
            );
        }
    }

    /// Bash separates words by space, tab and newline only: to it a carriage return or a
    /// no-break space is part of a word, so `cargo test\r` runs `cargo-test\r`.
    #[test]
    fn other_whitespace_is_no_separator_and_not_certain() {
        for command in [
            "cargo test\r",
            "cargo test\r\n",
            "cargo test\u{a0}",
            "cargo test\u{85}",
            "cargo test\u{b}",
            "cargo test\u{c}",
            "cargo test\u{3000}",
            "\u{a0}cargo test",
            "\rcargo test",
            "cargo\u{a0}test",
            "cargo\rtest",
        ] {
            assert_eq!(
                parse(command).map(|c| c.argv),
                Err(NotCertain),
                "{command:?}"
            );
        }
    }

    #[test]
    fn quoting_round_trips_through_the_parser() {
        for word in [
            "plain",
            "a b",
            "it's",
            "",
            "$HOME",
            "x=1",
            "*",
            "-D warnings",
            "é",
        ] {
            let quoted = quote(word);
            let command = format!("prog {quoted}");
            assert_eq!(argv(&command), ["prog", word], "{quoted}");
        }
        assert_eq!(quote("/usr/bin/buildpool"), "/usr/bin/buildpool");
        assert_eq!(quote("a b"), "'a b'");
    }
}
