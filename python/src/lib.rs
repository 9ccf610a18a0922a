//! `djinn._djinn`: the Python extension over djinn-client (the `djinn` package re-exports it).
//!
//! Layout: [`client`] (connect, the connection's calls), [`session`] (sessions and one-call
//! generation), [`stream`] (token iterators), [`tensor`] (remote tensors and ops), [`buffer`]
//! (zero-copy memory for numpy), [`conn`] (the shared connection and its threading rules),
//! [`errors`] (Python exceptions).

use pyo3::prelude::*;

mod buffer;
mod client;
mod conn;
mod errors;
mod session;
mod stream;
mod tensor;

#[pymodule]
fn _djinn(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(client::connect, m)?)?;
    m.add_class::<client::Client>()?;
    m.add_class::<session::Session>()?;
    m.add_class::<session::Generation>()?;
    m.add_class::<stream::TokenStream>()?;
    m.add_class::<tensor::Tensor>()?;
    m.add_class::<buffer::HostBuffer>()?;
    Ok(())
}
