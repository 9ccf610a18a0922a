//! C ABI over djinn-client.
