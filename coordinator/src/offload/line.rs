//! A command line read as bash reads it (with `brush-parser`), down to the programs it
//! starts: every simple command at any depth (pipelines, lists, subshells, loops, `$(…)`,
//! `bash -c '…'`), with the directory an earlier `cd` left and whether it runs in the
//! background.
//!
//! Nothing here decides what runs where, and nothing depends on it: the cargo shim decides
//! each cargo as it starts, with the words bash really gave it. This reading only lets
//! `hook explain` say beforehand what the shim will do, and lets `hook install` recognise
//! its own entries. Words whose value is known only when the line runs (`$VAR`, `$(…)`,
//! globs, `~`) are reported as such, never guessed.

use std::path::{Path, PathBuf};

use brush_parser::ast::{
    Command, CommandPrefixOrSuffixItem, CompoundCommand, CompoundList, IoFileRedirectTarget,
    IoRedirect, Pipeline, SeparatorOperator, SimpleCommand,
};
use brush_parser::word::{self, WordPiece, WordPieceWithSource};
use brush_parser::{Parser, ParserOptions};

/// Programs that run the rest of their arguments as a command, after words of their own
/// (options, `timeout`'s duration, `env`'s assignments: see [`unwrap`]).
const WRAPPERS: &[&str] = &[
    "timeout", "env", "nice", "nohup", "command", "exec", "stdbuf",
];

/// Whether `program` runs the rest of its arguments as a command (`timeout`, `env`, ...).
pub fn is_wrapper(program: &str) -> bool {
    WRAPPERS.contains(&program)
}

/// Shells whose `-c STRING` is a command line of its own.
const SHELLS: &[&str] = &["bash", "sh", "dash", "zsh"];

/// How deep lines inside lines are read; what a person or an agent types nests a few.
const MAX_NESTING: usize = 16;

/// How deep brackets may nest in a line that is read at all.
const MAX_BRACKET_DEPTH: usize = 64;

/// The deepest nesting of `(` and `{` in `line`, quotes and all: an upper bound of how deep
/// the parser recurses.
fn bracket_depth(line: &str) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0;
    for c in line.chars() {
        match c {
            '(' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// One program a command line starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The command as typed (with its redirections).
    pub typed: String,
    /// How deep inside other commands it is: 0 in the line itself, 1 inside a `bash -c` or a
    /// `$(…)` of it, and so on.
    pub depth: usize,
    /// Its first word, quotes removed; `None` when it is known only when the line runs.
    pub name: Option<String>,
    /// Its words, quotes removed; `None` when one of them is known only when the line runs.
    pub argv: Option<Vec<String>>,
    /// Where it runs; `None` when an earlier `cd` goes where only running the line tells.
    pub dir: Option<PathBuf>,
    /// Started with `&` (or inside something that is), so no one waits for it.
    pub background: bool,
}

impl Invocation {
    /// The program and its arguments once wrappers such as `timeout 300` or
    /// `env NAME=VALUE` are peeled off; `None` when a word is known only at run time or a
    /// wrapper's options cannot be read.
    pub fn program(&self) -> Option<&[String]> {
        let mut argv = self.argv.as_deref()?;
        while let Some((first, rest)) = argv.split_first() {
            if !is_wrapper(first) {
                break;
            }
            argv = unwrap(first, rest)?;
        }
        Some(argv)
    }
}

/// The command a wrapper runs: what follows its options (and `timeout`'s duration, and
/// `env`'s assignments).
fn unwrap<'a>(wrapper: &str, args: &'a [String]) -> Option<&'a [String]> {
    // Options of these wrappers that take a separate value.
    let with_value: &[&str] = match wrapper {
        "timeout" => &["-s", "--signal", "-k", "--kill-after"],
        "env" => &["-u", "--unset"],
        "nice" => &["-n", "--adjustment"],
        "stdbuf" => &["-i", "-o", "-e"],
        _ => &[],
    };
    let mut rest = args;
    while let Some((arg, after)) = rest.split_first() {
        if arg == "--" {
            rest = after;
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            break;
        }
        if wrapper == "env"
            && (matches!(arg.as_str(), "-C" | "--chdir" | "-S" | "--split-string")
                || arg.starts_with("--chdir=")
                || arg.starts_with("--split-string="))
        {
            // `env` changing directory or splitting a string: not followed here.
            return None;
        }
        rest = if with_value.contains(&arg.as_str()) {
            after.get(1..)?
        } else {
            after
        };
    }
    match wrapper {
        "timeout" => rest.get(1..),
        "env" => Some(&rest[rest.iter().take_while(|arg| arg.contains('=')).count()..]),
        _ => Some(rest),
    }
}

/// The line is not shell syntax bash accepts (as far as brush-parser tells).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a command line bash can read: {0}")]
pub struct Unreadable(String);

/// Every program `line`, typed in `cwd` (absolute), starts, in the order they appear.
pub fn invocations(line: &str, cwd: &Path) -> Result<Vec<Invocation>, Unreadable> {
    let mut reader = Reader::default();
    reader.line(
        line,
        &mut Scope {
            dir: Some(cwd.to_owned()),
            background: false,
        },
    )?;
    Ok(reader.found)
}

/// What commands inherit from where they appear.
#[derive(Debug, Clone)]
struct Scope {
    dir: Option<PathBuf>,
    background: bool,
}

#[derive(Default)]
struct Reader {
    found: Vec<Invocation>,
    depth: usize,
    /// How many lines the reading is inside that [`Self::read_again`] read.
    reread: usize,
}

impl Reader {
    fn line(&mut self, line: &str, scope: &mut Scope) -> Result<(), Unreadable> {
        if bracket_depth(line) > MAX_BRACKET_DEPTH {
            // The parser, and this reading, recurse per bracket: a hostile depth would
            // overflow the stack rather than fail.
            return Err(Unreadable(format!(
                "brackets nested deeper than {MAX_BRACKET_DEPTH}"
            )));
        }
        let program = Parser::new(line.as_bytes(), &ParserOptions::default())
            .parse_program()
            .map_err(|error| Unreadable(error.to_string()))?;
        for list in &program.complete_commands {
            self.list(list, scope);
        }
        Ok(())
    }

    /// Reads `line` as a line of its own, run by bash beneath this one: inside another
    /// command (`bash -c STRING`, `$(…)`, `<(…)`: one level `deeper` for display), or
    /// parenthesised commands the parser took for something else (at this depth). What it
    /// cannot read is still run by bash; it is then simply not listed, like anything read
    /// again more than [`MAX_NESTING`] times over (which bounds the recursion).
    fn read_again(&mut self, line: &str, scope: &Scope, deeper: bool) {
        if self.reread >= MAX_NESTING {
            return;
        }
        self.reread += 1;
        self.depth += usize::from(deeper);
        let _ = self.line(line, &mut scope.clone());
        self.depth -= usize::from(deeper);
        self.reread -= 1;
    }

    fn list(&mut self, list: &CompoundList, scope: &mut Scope) {
        for item in &list.0 {
            if matches!(item.1, SeparatorOperator::Async) {
                // A background list runs in a subshell: its `cd` stays there.
                let mut background = Scope {
                    background: true,
                    ..scope.clone()
                };
                self.and_or(&item.0, &mut background);
            } else {
                self.and_or(&item.0, scope);
            }
        }
    }

    fn and_or(&mut self, list: &brush_parser::ast::AndOrList, scope: &mut Scope) {
        self.pipeline(&list.first, scope);
        for next in &list.additional {
            let (brush_parser::ast::AndOr::And(pipeline) | brush_parser::ast::AndOr::Or(pipeline)) =
                next;
            self.pipeline(pipeline, scope);
        }
    }

    fn pipeline(&mut self, pipeline: &Pipeline, scope: &mut Scope) {
        if let [command] = pipeline.seq.as_slice() {
            self.command(command, scope);
        } else {
            // Each stage of a pipeline runs in a subshell of its own.
            for command in &pipeline.seq {
                self.command(command, &mut scope.clone());
            }
        }
    }

    fn command(&mut self, command: &Command, scope: &mut Scope) {
        match command {
            Command::Simple(simple) => self.simple(simple, scope),
            Command::Compound(compound, redirects) => {
                self.compound(compound, scope);
                for redirect in redirects.iter().flat_map(|list| &list.0) {
                    self.redirect(redirect, scope);
                }
            }
            Command::Function(function) => self.compound(&function.body.0, &mut scope.clone()),
            Command::ExtendedTest(..) => {}
        }
    }

    fn compound(&mut self, compound: &CompoundCommand, scope: &mut Scope) {
        match compound {
            CompoundCommand::BraceGroup(group) => self.list(&group.list, scope),
            CompoundCommand::Subshell(subshell) => self.list(&subshell.list, &mut scope.clone()),
            CompoundCommand::ForClause(for_clause) => {
                for value in for_clause.values.iter().flatten() {
                    self.word(&value.value, scope);
                }
                self.list(&for_clause.body.list, scope);
            }
            CompoundCommand::ArithmeticForClause(for_clause) => {
                self.list(&for_clause.body.list, scope);
            }
            CompoundCommand::CaseClause(case) => {
                for item in &case.cases {
                    if let Some(list) = &item.cmd {
                        self.list(list, &mut scope.clone());
                    }
                }
            }
            CompoundCommand::IfClause(if_clause) => {
                self.list(&if_clause.condition, scope);
                self.list(&if_clause.then, &mut scope.clone());
                for clause in if_clause.elses.iter().flatten() {
                    if let Some(condition) = &clause.condition {
                        self.list(condition, &mut scope.clone());
                    }
                    self.list(&clause.body, &mut scope.clone());
                }
            }
            CompoundCommand::WhileClause(clause) | CompoundCommand::UntilClause(clause) => {
                self.list(&clause.0, scope);
                self.list(&clause.1.list, &mut scope.clone());
            }
            CompoundCommand::Coprocess(coprocess) => {
                let mut background = Scope {
                    background: true,
                    ..scope.clone()
                };
                self.command(&coprocess.body, &mut background);
            }
            // Bash reads `( (cargo test) )` as two subshells where `((` is no arithmetic;
            // brush-parser takes it for one, so what is no arithmetic is read as commands.
            CompoundCommand::Arithmetic(arithmetic)
                if brush_parser::arithmetic::parse(&arithmetic.expr.value).is_err() =>
            {
                self.read_again(&arithmetic.expr.value, scope, false);
            }
            CompoundCommand::Arithmetic(_) => {}
        }
    }

    fn redirect(&mut self, redirect: &IoRedirect, scope: &Scope) {
        if let IoRedirect::File(_, _, IoFileRedirectTarget::ProcessSubstitution(_, subshell)) =
            redirect
        {
            self.list(&subshell.list, &mut scope.clone());
        }
    }

    fn simple(&mut self, command: &SimpleCommand, scope: &mut Scope) {
        // Assignments before the program are its environment: read only for the
        // substitutions in them.
        for item in command.prefix.iter().flat_map(|prefix| &prefix.0) {
            self.item(item, scope);
        }
        let Some(name) = &command.word_or_name else {
            return;
        };
        let mut argv = vec![self.word(&name.value, scope)];
        for item in command.suffix.iter().flat_map(|suffix| &suffix.0) {
            argv.extend(self.item(item, scope));
        }
        let name = argv[0].clone();
        let is_cd = name.as_deref() == Some("cd");
        let argv: Option<Vec<String>> = argv.into_iter().collect();
        let invocation = Invocation {
            typed: typed(command),
            depth: self.depth,
            name,
            argv,
            dir: scope.dir.clone(),
            background: scope.background,
        };
        if is_cd {
            scope.dir = match (invocation.argv.as_deref(), &scope.dir) {
                (Some([_, dir]), Some(from)) if dir != "-" => Some(from.join(dir)),
                _ => None,
            };
        } else if let Some([shell, flag, line, ..]) = invocation.program()
            && SHELLS.contains(&shell.as_str())
            && flag == "-c"
        {
            let line = line.clone();
            self.found.push(invocation);
            self.read_again(&line, scope, true);
            return;
        }
        self.found.push(invocation);
    }

    /// A word of `item` (`None` for a redirection), read as [`Self::word`] does.
    fn item(&mut self, item: &CommandPrefixOrSuffixItem, scope: &Scope) -> Option<Option<String>> {
        match item {
            CommandPrefixOrSuffixItem::IoRedirect(redirect) => {
                self.redirect(redirect, scope);
                None
            }
            CommandPrefixOrSuffixItem::ProcessSubstitution(_, subshell) => {
                self.list(&subshell.list, &mut scope.clone());
                None
            }
            CommandPrefixOrSuffixItem::AssignmentWord(_, word)
            | CommandPrefixOrSuffixItem::Word(word) => Some(self.word(&word.value, scope)),
        }
    }

    /// `word` with its quotes removed, or `None` when its value is known only when the line
    /// runs. Command substitutions in it are read as lines of their own.
    fn word(&mut self, word: &str, scope: &Scope) -> Option<String> {
        let pieces = word::parse(word, &ParserOptions::default()).ok()?;
        self.pieces(&pieces, false, scope)
    }

    fn pieces(
        &mut self,
        pieces: &[WordPieceWithSource],
        quoted: bool,
        scope: &Scope,
    ) -> Option<String> {
        let mut text = Some(String::new());
        for piece in pieces {
            let value = match &piece.piece {
                WordPiece::Text(plain) if quoted || !plain.contains(['*', '?', '[', '{']) => {
                    Some(plain.clone())
                }
                WordPiece::SingleQuotedText(plain) => Some(plain.clone()),
                WordPiece::AnsiCQuotedText(plain) if !plain.contains('\\') => Some(plain.clone()),
                WordPiece::EscapeSequence(escaped) => Some(
                    escaped
                        .strip_prefix('\\')
                        .unwrap_or(escaped)
                        .replace('\n', ""),
                ),
                WordPiece::DoubleQuotedSequence(inner)
                | WordPiece::GettextDoubleQuotedSequence(inner) => self.pieces(inner, true, scope),
                WordPiece::CommandSubstitution(line)
                | WordPiece::BackquotedCommandSubstitution(line) => {
                    self.read_again(line, scope, true);
                    None
                }
                _ => None,
            };
            text = text.zip(value).map(|(text, value)| text + &value);
        }
        text
    }
}

/// `command` as typed: its words as they were written, its redirections without the space
/// the parser's own display puts in them (`2>&1`, not `2>& 1`).
fn typed(command: &SimpleCommand) -> String {
    let prefix = command.prefix.iter().flat_map(|prefix| &prefix.0);
    let suffix = command.suffix.iter().flat_map(|suffix| &suffix.0);
    let name = command.word_or_name.iter().map(|word| word.value.clone());
    let item = |item: &CommandPrefixOrSuffixItem| match item {
        CommandPrefixOrSuffixItem::IoRedirect(IoRedirect::File(fd, kind, target)) => {
            let fd = fd.map(|fd| fd.to_string()).unwrap_or_default();
            format!("{fd}{kind}{target}")
        }
        CommandPrefixOrSuffixItem::IoRedirect(IoRedirect::OutputAndError(target, append)) => {
            format!("&>{}{target}", if *append { ">" } else { "" })
        }
        other => other.to_string(),
    };
    prefix
        .map(item)
        .chain(name)
        .chain(suffix.map(item))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(line: &str) -> Vec<Invocation> {
        invocations(line, Path::new("/repo")).expect("readable")
    }

    fn argvs(line: &str) -> Vec<Option<Vec<String>>> {
        read(line).into_iter().map(|found| found.argv).collect()
    }

    fn words(words: &[&str]) -> Option<Vec<String>> {
        Some(words.iter().map(|word| (*word).to_owned()).collect())
    }

    #[test]
    fn every_program_of_pipelines_lists_and_subshells_is_found() {
        assert_eq!(
            argvs("cargo check && cargo test 2>&1 | tail -20; (cargo build) || echo x"),
            [
                words(&["cargo", "check"]),
                words(&["cargo", "test"]),
                words(&["tail", "-20"]),
                words(&["cargo", "build"]),
                words(&["echo", "x"]),
            ]
        );
        assert_eq!(
            argvs("( (cd app && cargo test) )"),
            [words(&["cd", "app"]), words(&["cargo", "test"])]
        );
        assert!(argvs("(( i + 1 ))").is_empty(), "arithmetic starts nothing");
        assert_eq!(
            argvs("if cargo check; then cargo test; fi"),
            [words(&["cargo", "check"]), words(&["cargo", "test"])]
        );
    }

    #[test]
    fn quotes_are_removed_and_run_time_values_are_not_guessed() {
        assert_eq!(
            argvs(r#"cargo test 'a b' "c d" e\ f"#),
            [words(&["cargo", "test", "a b", "c d", "e f"])]
        );
        for line in [
            "cargo test $FILTER",
            "cargo test \"$FILTER\"",
            "cargo test *",
            "cargo test ~/x",
        ] {
            assert_eq!(argvs(line), [None], "{line}");
        }
    }

    #[test]
    fn assignments_before_the_program_are_not_its_arguments() {
        assert_eq!(
            argvs("RUST_BACKTRACE=1 cargo test X=1"),
            [words(&["cargo", "test", "X=1"])]
        );
        assert!(argvs("A=1 B=2").is_empty());
    }

    #[test]
    fn bash_c_and_command_substitutions_are_read_inside() {
        let found = read("bash -c 'cargo build && cargo test' | tail");
        let nested: Vec<_> = found
            .iter()
            .map(|found| (found.depth, found.argv.clone()))
            .collect();
        assert_eq!(
            nested,
            [
                (0, words(&["bash", "-c", "cargo build && cargo test"])),
                (1, words(&["cargo", "build"])),
                (1, words(&["cargo", "test"])),
                (0, words(&["tail"])),
            ]
        );
        let found = read("n=$(cargo test 2>&1 | grep -c ok); echo $n");
        assert_eq!(found[0].argv, words(&["cargo", "test"]));
        assert_eq!(found[0].depth, 1);
    }

    #[test]
    fn wrappers_are_peeled_to_the_program_they_run() {
        for line in [
            "timeout 300 cargo test",
            "timeout -k 5 --preserve-status 300 cargo test",
            "env RUST_BACKTRACE=1 cargo test",
            "nice -n 10 cargo test",
            "nohup timeout 9 cargo test",
        ] {
            let found = read(line);
            assert_eq!(
                found[0].program(),
                Some(&["cargo".to_owned(), "test".to_owned()][..]),
                "{line}"
            );
        }
        assert_eq!(read("env -C app cargo test")[0].program(), None);
    }

    #[test]
    fn a_cd_moves_what_follows_it_in_the_same_shell_only() {
        let found = read("cd app && cargo test; (cd ../util && cargo build); cargo check");
        let dirs: Vec<_> = found.iter().map(|found| found.dir.clone()).collect();
        let at = |dir: &str| Some(PathBuf::from(dir));
        assert_eq!(
            dirs,
            [
                at("/repo"),
                at("/repo/app"),
                at("/repo/app"),
                at("/repo/app/../util"),
                at("/repo/app")
            ]
        );
        assert_eq!(read("cd $X && cargo test")[1].dir, None);
    }

    #[test]
    fn what_runs_with_an_ampersand_is_in_the_background() {
        let found = read("cargo build & cargo test; (cargo check) & wait");
        let background: Vec<_> = found.iter().map(|found| found.background).collect();
        assert_eq!(background, [true, false, true, false]);
    }

    #[test]
    fn lines_nested_deeper_than_the_bound_are_not_listed() {
        let mut line = "cargo test".to_owned();
        for _ in 0..40 {
            line = format!("echo $({line})");
        }
        let found = read(&line);
        assert!(found.iter().all(|found| found.depth <= MAX_NESTING));
        assert!(
            !found
                .iter()
                .any(|found| found.name.as_deref() == Some("cargo"))
        );
    }

    #[test]
    fn a_line_bash_cannot_read_is_unreadable() {
        let deep = format!("{}cargo test{}", "(true; ".repeat(5000), ")".repeat(5000));
        for line in [
            deep.as_str(),
            "cargo test 'unterminated",
            "cargo test && ",
            "( cargo test",
        ] {
            assert!(invocations(line, Path::new("/repo")).is_err(), "{line}");
        }
    }
}
