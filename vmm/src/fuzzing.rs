//! Entry point of the `http_request` fuzz target in `fuzz/` (feature `fuzzing`), and the test
//! that feeds every committed corpus file through it, so that `cargo test` exercises the
//! corpus without building the fuzzer. The entry takes raw fuzzer bytes and must never panic.

use crate::api::http::{read_request, MAX_BODY};

/// Target `http_request`: the control API's request parser on arbitrary bytes; what it
/// accepts must be a request the router can take at face value.
pub fn http_request(data: &[u8]) {
    match read_request(data) {
        Ok(Some(request)) => {
            assert!(request.path.starts_with('/'), "path {:?}", request.path);
            assert!(
                !request.path.contains('?'),
                "query kept in {:?}",
                request.path
            );
            assert!(
                request.body.len() <= MAX_BODY,
                "a {}-byte body",
                request.body.len()
            );
            assert!(!request.method.contains(' '), "method {:?}", request.method);
        }
        // "No request" only for a peer that sent nothing at all.
        Ok(None) => assert!(data.is_empty(), "{} bytes read as no request", data.len()),
        Err(e) => assert!((400..600).contains(&e.status), "status {}", e.status),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Every file of `fuzz/corpus/http_request` goes through the fuzz target's entry point.
    #[test]
    fn http_request_corpus() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/http_request");
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list the corpus {}: {e}", dir.display()))
            .map(|entry| entry.expect("corpus entry").path())
            .collect();
        assert!(!files.is_empty(), "corpus {} is empty", dir.display());
        for path in files {
            super::http_request(&std::fs::read(&path).expect("corpus file readable"));
        }
    }
}
