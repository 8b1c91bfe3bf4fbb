//! Our entries in Claude Code's `settings.json`, one per event we answer (see [`EVENTS`]):
//! added once, removed alone, and every other setting and hook kept as it was (key order
//! included).

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::offload::line;

/// The events the hook answers, with the matcher of each entry: `SessionStart` (every
/// session, however started), which puts the cargo shim first on the session's `PATH`, so
/// every cargo a command line runs, at any depth, decides for itself.
const EVENTS: [(&str, Option<&str>); 1] = [("SessionStart", None)];

/// Events an older buildpool answered and this one does not: `PreToolUse` rewrote plain
/// cargo commands and allowed them without a prompt. Installing removes our entries there.
const RETIRED: [&str; 1] = ["PreToolUse"];

/// Every event our entries may be found under.
fn all_events() -> impl Iterator<Item = &'static str> {
    EVENTS.iter().map(|(event, _)| *event).chain(RETIRED)
}

/// How long Claude Code waits for the hook, in seconds. It answers in milliseconds; the
/// bound matters only if something is badly wrong, and then the command runs as typed.
const TIMEOUT_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{0} is not a JSON object; left untouched")]
    NotAnObject(&'static str),
    #[error("hooks.{0} is not a JSON array; left untouched")]
    NotAnArray(&'static str),
}

/// Whether a hook command is ours: `buildpool hook claude`, wherever `buildpool` lives.
pub fn is_ours(command: &str) -> bool {
    let Ok(read) = line::invocations(command, Path::new("/")) else {
        return false;
    };
    matches!(read.as_slice(), [only] if matches!(only.argv.as_deref(), Some([program, hook, claude])
        if Path::new(program).file_name().is_some_and(|name| name == "buildpool")
            && hook == "hook"
            && claude == "claude"))
}

fn ours_in(entry: &Value) -> impl Iterator<Item = &str> {
    entry
        .get("hooks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|hook| hook.get("command").and_then(Value::as_str))
        .filter(|command| is_ours(command))
}

/// The entries of `event`, if there are any.
fn entries<'a>(
    settings: &'a Value,
    event: &'static str,
) -> Result<Option<&'a Vec<Value>>, SettingsError> {
    let settings = settings
        .as_object()
        .ok_or(SettingsError::NotAnObject("the settings file"))?;
    let Some(hooks) = settings.get("hooks") else {
        return Ok(None);
    };
    let hooks = hooks
        .as_object()
        .ok_or(SettingsError::NotAnObject("hooks"))?;
    match hooks.get(event) {
        None => Ok(None),
        Some(entries) => entries
            .as_array()
            .map(Some)
            .ok_or(SettingsError::NotAnArray(event)),
    }
}

/// Adds the hook running `command` for each of [`EVENTS`], and removes ours from
/// [`RETIRED`] events. Returns whether anything changed: an entry of ours with exactly this
/// command is left where it is, one with another path is replaced. Nothing changes unless
/// every event's entries can take ours.
pub fn install(settings: &mut Value, command: &str) -> Result<bool, SettingsError> {
    for event in all_events() {
        entries(settings, event)?;
    }
    let mut changed = false;
    for (event, matcher) in EVENTS {
        changed |= install_for(settings, event, matcher, command)?;
    }
    for event in RETIRED {
        changed |= uninstall_for(settings, event)?;
    }
    Ok(changed)
}

fn install_for(
    settings: &mut Value,
    event: &'static str,
    matcher: Option<&str>,
    command: &str,
) -> Result<bool, SettingsError> {
    let present = entries(settings, event)?
        .map(Vec::as_slice)
        .unwrap_or_default();
    let ours: Vec<(&Value, &str)> = present
        .iter()
        .flat_map(|entry| ours_in(entry).map(move |found| (entry, found)))
        .collect();
    if let [(entry, found)] = ours.as_slice()
        && *found == command
        && entry.get("matcher").and_then(Value::as_str) == matcher
    {
        return Ok(false);
    }
    uninstall_for(settings, event)?;
    let settings = settings
        .as_object_mut()
        .ok_or(SettingsError::NotAnObject("the settings file"))?;
    let hooks = settings
        .entry("hooks")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or(SettingsError::NotAnObject("hooks"))?;
    let mut entry = Map::new();
    if let Some(matcher) = matcher {
        entry.insert("matcher".to_owned(), json!(matcher));
    }
    entry.insert(
        "hooks".to_owned(),
        json!([{ "type": "command", "command": command, "timeout": TIMEOUT_SECS }]),
    );
    hooks
        .entry(event)
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .ok_or(SettingsError::NotAnArray(event))?
        .push(Value::Object(entry));
    Ok(true)
}

/// Removes every hook of ours, and the entries, events and `hooks` that only removing them
/// left empty. Returns whether anything changed.
pub fn uninstall(settings: &mut Value) -> Result<bool, SettingsError> {
    for event in all_events() {
        entries(settings, event)?;
    }
    let mut changed = false;
    for event in all_events() {
        changed |= uninstall_for(settings, event)?;
    }
    Ok(changed)
}

fn uninstall_for(settings: &mut Value, event: &'static str) -> Result<bool, SettingsError> {
    if entries(settings, event)?.is_none() {
        return Ok(false);
    }
    let Some(settings) = settings.as_object_mut() else {
        return Ok(false);
    };
    let Some(hooks) = settings.get_mut("hooks").and_then(Value::as_object_mut) else {
        return Ok(false);
    };
    let Some(entries) = hooks.get_mut(event).and_then(Value::as_array_mut) else {
        return Ok(false);
    };
    let mut removed = 0;
    entries.retain_mut(|entry| {
        let Some(list) = entry.get_mut("hooks").and_then(Value::as_array_mut) else {
            return true;
        };
        let before = list.len();
        list.retain(|hook| {
            !hook
                .get("command")
                .and_then(Value::as_str)
                .is_some_and(is_ours)
        });
        removed += before - list.len();
        !list.is_empty() || before == 0
    });
    if removed == 0 {
        return Ok(false);
    }
    if entries.is_empty() {
        hooks.remove(event);
    }
    if hooks.is_empty() {
        settings.remove("hooks");
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "buildpool hook claude";

    /// Settings as people have them: other keys, other PreToolUse hooks, other events.
    fn busy_settings() -> Value {
        json!({
            "permissions": { "allow": ["Bash(git status)"] },
            "hooks": {
                "PreToolUse": [
                    { "matcher": "Bash", "hooks": [{ "type": "command", "command": "audit.sh" }] },
                    { "matcher": "Write|Edit", "hooks": [{ "type": "command", "command": "fmt.sh" }] }
                ],
                "Stop": [{ "hooks": [{ "type": "command", "command": "notify-send done" }] }]
            },
            "model": "opus"
        })
    }

    #[test]
    fn ours_is_buildpool_hook_claude_from_any_path() {
        assert!(is_ours(OURS));
        assert!(is_ours("/usr/local/bin/buildpool hook claude"));
        assert!(is_ours("'/home/me/my tools/buildpool' hook claude"));
        assert!(!is_ours("buildpool hook claude --other"));
        assert!(!is_ours("audit.sh"));
        assert!(!is_ours("notbuildpool hook claude"));
        assert!(!is_ours("buildpool hook claude | tee log"));
    }

    #[test]
    fn install_adds_one_entry_keeps_everything_else_and_is_idempotent() {
        let mut settings = busy_settings();
        assert!(install(&mut settings, OURS).expect("installs"));
        let once = settings.clone();
        assert!(!install(&mut settings, OURS).expect("installs"));
        assert_eq!(settings, once);
        assert_eq!(
            settings["hooks"]["PreToolUse"],
            busy_settings()["hooks"]["PreToolUse"],
            "no PreToolUse hook of ours"
        );
        assert_eq!(
            settings["hooks"]["SessionStart"],
            json!([{ "hooks": [{ "type": "command", "command": OURS, "timeout": TIMEOUT_SECS }] }])
        );
        // Everything else is as it was, in the same order.
        let mut without = settings.clone();
        assert!(uninstall(&mut without).expect("uninstalls"));
        assert_eq!(without, busy_settings());
        let keys: Vec<&String> = without.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["permissions", "hooks", "model"]);
    }

    #[test]
    fn install_replaces_an_entry_of_ours_with_another_path() {
        let mut settings = busy_settings();
        install(&mut settings, "/old/buildpool hook claude").expect("installs");
        assert!(install(&mut settings, OURS).expect("installs"));
        let text = settings.to_string();
        assert!(!text.contains("/old/buildpool"), "{text}");
        assert_eq!(text.matches("hook claude").count(), 1, "{text}");
    }

    /// An older buildpool also answered PreToolUse, rewriting and allowing plain cargo
    /// commands; installing this one takes that entry out and keeps everyone else's.
    #[test]
    fn install_removes_the_retired_pre_tool_use_entry_of_an_older_buildpool() {
        let mut settings = busy_settings();
        settings["hooks"]["PreToolUse"]
            .as_array_mut()
            .expect("array")
            .push(json!({ "matcher": "Bash", "hooks": [{ "type": "command", "command": OURS }] }));
        assert!(install(&mut settings, OURS).expect("installs"));
        assert_eq!(
            settings["hooks"]["PreToolUse"],
            busy_settings()["hooks"]["PreToolUse"]
        );
        assert!(uninstall(&mut settings).expect("uninstalls"));
        assert_eq!(settings, busy_settings());
    }

    #[test]
    fn uninstall_removes_only_ours_and_what_that_left_empty() {
        let mut empty = json!({});
        install(&mut empty, OURS).expect("installs");
        assert!(uninstall(&mut empty).expect("uninstalls"));
        assert_eq!(empty, json!({}));
        assert!(!uninstall(&mut empty).expect("uninstalls"));

        // Ours beside someone else's hook in one entry: only ours goes.
        let mut shared = json!({ "hooks": { "PreToolUse": [{ "matcher": "Bash", "hooks": [
            { "type": "command", "command": "audit.sh" },
            { "type": "command", "command": OURS }
        ]}], "PostToolUse": [] } });
        assert!(uninstall(&mut shared).expect("uninstalls"));
        assert_eq!(
            shared,
            json!({ "hooks": { "PreToolUse": [{ "matcher": "Bash", "hooks": [
                { "type": "command", "command": "audit.sh" }
            ]}], "PostToolUse": [] } })
        );
    }

    #[test]
    fn settings_of_an_unexpected_shape_are_left_alone() {
        for mut odd in [
            json!([]),
            json!({ "hooks": [] }),
            json!({ "hooks": { "PreToolUse": {} } }),
            json!({ "hooks": { "SessionStart": "x" } }),
        ] {
            let before = odd.clone();
            assert!(install(&mut odd, OURS).is_err(), "{before}");
            assert!(uninstall(&mut odd).is_err(), "{before}");
            assert_eq!(odd, before);
        }
    }
}
