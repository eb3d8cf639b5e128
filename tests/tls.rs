//! TLS tests (placeholder).
