//! Words for the shell: what buildpool writes into a command line that a shell reads back
//! (the session's `export PATH=…`, the hook's command in Claude Code's settings).

use std::borrow::Cow;

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
    use std::path::Path;

    use super::*;
    use crate::offload::line;

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
            let read = line::invocations(&command, Path::new("/")).expect("readable");
            assert_eq!(
                read[0].argv,
                Some(vec!["prog".to_owned(), word.to_owned()]),
                "{quoted}"
            );
        }
        assert_eq!(quote("/usr/bin/buildpool"), "/usr/bin/buildpool");
        assert_eq!(quote("a b"), "'a b'");
    }
}
