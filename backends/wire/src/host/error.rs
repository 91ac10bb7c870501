//! How a splitvisor process shows an error to its user: one line, "program: what failed:
//! because: because", each cause once, written to stderr in one write(2) so that lines of
//! processes sharing a stderr (launch, the VMM, the daemons) never interleave.

use std::io::Write as _;

/// "what failed: because: because", each cause once (a cause whose text the line already
/// holds, as a `#[error(transparent)]` or a message quoting its source, is not repeated).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// Writes `line` and a newline to stderr in one write(2).
pub fn eprint_line(line: &str) {
    let mut whole = String::with_capacity(line.len() + 1);
    whole.push_str(line);
    whole.push('\n');
    let _ = std::io::stderr().lock().write_all(whole.as_bytes());
}

/// Prints "`program`: error chain" to stderr: how every splitvisor binary reports the error
/// it exits with.
pub fn report(program: &str, error: &dyn std::error::Error) {
    eprint_line(&format!("{program}: {}", error_chain(error)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot open the image")]
        Open(#[source] std::io::Error),
        #[error(transparent)]
        Inner(#[from] std::io::Error),
    }

    #[test]
    fn causes_are_joined_once() {
        let e = Outer::Open(std::io::Error::other("no such file"));
        assert_eq!(error_chain(&e), "cannot open the image: no such file");
        let e = Outer::Inner(std::io::Error::other("no such file"));
        assert_eq!(error_chain(&e), "no such file");
    }
}
