//! Unit tests of request parsing and execution over MockSplitQueue chains.
