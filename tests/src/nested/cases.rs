//! Reading the output of several L2 guests run one after another (or side by side) in one L1
//! boot: each guest's lines are printed in L1 with a prefix `<case>| `, and a test collects its
//! failed checks so that one (slow) nested run reports every failure at once.

use super::NestedRun;

/// The output lines of case `name` (without the prefix `<name>| `).
pub fn case_lines<'a>(run: &'a NestedRun, name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}| ");
    run.lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

/// All values of marker `SV:key=` printed in case `name`, in order (a marker may follow other
/// text on its line, e.g. a kernel message).
pub fn case_markers<'a>(run: &'a NestedRun, name: &str, key: &str) -> Vec<&'a str> {
    case_lines(run, name)
        .into_iter()
        .filter_map(|l| l.split_once("SV:").map(|(_, m)| m.trim_end_matches('\r')))
        .filter_map(|m| m.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .collect()
}

/// The last value of marker `key` in case `name`.
pub fn case_marker<'a>(run: &'a NestedRun, name: &str, key: &str) -> Option<&'a str> {
    case_markers(run, name, key).pop()
}

/// Collects failed checks; [`Checks::finish`] panics with all of them and the run's report.
#[derive(Debug, Default)]
pub struct Checks(Vec<String>);

impl Checks {
    /// `got` must be `Some(want)`.
    pub fn eq(&mut self, what: &str, got: Option<&str>, want: &str) {
        if got != Some(want) {
            self.0.push(format!("{what}: got {got:?}, want {want:?}"));
        }
    }

    /// `ok` must hold; `detail` says what was seen.
    pub fn that(&mut self, what: &str, ok: bool, detail: impl std::fmt::Display) {
        if !ok {
            self.0.push(format!("{what}: {detail}"));
        }
    }

    /// Record a failure found some other way.
    pub fn fail(&mut self, what: impl std::fmt::Display) {
        self.0.push(what.to_string());
    }

    /// Panic with every failed check, the script's output and L1's console tail.
    pub fn finish(self, run: &NestedRun) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n  {}\n{}",
            self.0.len(),
            self.0.join("\n  "),
            run.report()
        );
    }
}
