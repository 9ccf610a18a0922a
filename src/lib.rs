//! djinn-dataplane: the binary's library half (CLI plumbing and the kernels compiled by build.rs).
