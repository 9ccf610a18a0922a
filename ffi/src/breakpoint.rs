//! Breakpoints over the C ABI: [`djinn_generate_ids_breakpoints`] feeds ids and decodes with the
//! input pass pausing after each given layer; at each pause the pause callback gets a
//! `djinn_pause` handle, valid only during that callback, through which it reads
//! ([`djinn_pause_read`]) or replaces ([`djinn_pause_write`]) the hidden state; returning 0
//! resumes, non-zero cancels (the request ends cancelled and the session is as before it).
//! [`djinn_prefill_ids_breakpoints`] does the same for a prefill: its pass feeds every id, and
//! the next generate without input samples its first token from the state the pass kept.
//!
//! The client stays leased for the whole call; the handle reaches it through a raw pointer that
//! is only dereferenced while the callback runs, when the Rust side does not touch the client.

use super::*;
use djinn_client::Feed as ClientFeed;

/// `djinn_pause`: one pause, valid during its callback.
pub struct DjinnPause {
    client: *mut Client,
    session: u64,
    layer: u32,
    tokens: u32,
    hidden: u32,
}

/// `djinn_pause_cb`.
pub type DjinnPauseCb = Option<
    unsafe extern "C" fn(user: *mut c_void, pause: *mut DjinnPause, layer: u32, tokens: u32, hidden: u32) -> c_int,
>;

/// Most breakpoints one call takes (the wire's bound).
const BREAKPOINTS_MAX: usize = djinn_proto::BREAKPOINTS_MAX;

/// See `djinn.h`.
///
/// # Safety
/// As [`djinn_generate_ids`]; `layers` points to `n_layers` readable u32; `pause_cb` NULL or
/// callable with `user` during the call.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn djinn_generate_ids_breakpoints(
    client: *mut DjinnClient,
    session: u64,
    ids: *const u32,
    n_ids: usize,
    layers: *const u32,
    n_layers: usize,
    params: *const DjinnDecodeParams,
    cb: DjinnTokenCb,
    pause_cb: DjinnPauseCb,
    user: *mut c_void,
    out: *mut DjinnGenerateResult,
) -> c_int {
    guard("djinn_generate_ids_breakpoints", || {
        // SAFETY: per this function's contract.
        let mut client = unsafe { client_arg(client) }?;
        // SAFETY: per this function's contract.
        let (ids, layers) = unsafe { pass_args(ids, n_ids, layers, n_layers) }?;
        // SAFETY: per this function's contract.
        let opts = unsafe { decode_options(params) }?;
        // SAFETY: per this function's contract.
        let mut fwd = unsafe { TokenForwarder::new(cb, user) };
        let on_token = |ev: &TokenEvent<'_>| fwd.on_token(ev);
        let on_pause =
            |c: &mut Client, note: &djinn_proto::PausedNote| pause_callback(pause_cb, user, c, session, note);
        let summary =
            client.generate_with_breakpoints(session, ClientFeed::Ids(ids), &opts, layers, on_token, on_pause)?;
        // SAFETY: per this function's contract.
        unsafe { fwd.write_result(&summary, out) };
        Ok(())
    })
}

/// See `djinn.h`.
///
/// # Safety
/// `client` as in [`djinn_generate_ids`]; `ids` readable for `n_ids` u32, `layers` for
/// `n_layers`; `pause_cb` NULL or callable with `user` during the call; `context_tokens` NULL or
/// writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn djinn_prefill_ids_breakpoints(
    client: *mut DjinnClient,
    session: u64,
    ids: *const u32,
    n_ids: usize,
    layers: *const u32,
    n_layers: usize,
    pause_cb: DjinnPauseCb,
    user: *mut c_void,
    context_tokens: *mut u32,
) -> c_int {
    guard("djinn_prefill_ids_breakpoints", || {
        // SAFETY: per this function's contract.
        let mut client = unsafe { client_arg(client) }?;
        // SAFETY: per this function's contract.
        let (ids, layers) = unsafe { pass_args(ids, n_ids, layers, n_layers) }?;
        let on_pause =
            |c: &mut Client, note: &djinn_proto::PausedNote| pause_callback(pause_cb, user, c, session, note);
        let r = client.prefill_with_breakpoints(session, djinn_client::Input::Ids(ids), layers, on_pause)?;
        // SAFETY: NULL or writable per this function's contract.
        if let Some(out) = unsafe { context_tokens.as_mut() } {
            *out = r.context_tokens;
        }
        Ok(())
    })
}

/// Runs the caller's pause callback (NULL: resume at once) and resumes or cancels as it says.
fn pause_callback(
    pause_cb: DjinnPauseCb,
    user: *mut c_void,
    c: &mut Client,
    session: u64,
    note: &djinn_proto::PausedNote,
) -> djinn_client::Result<()> {
    let Some(f) = pause_cb else { return c.resume(session) };
    let mut pause = DjinnPause { client: c, session, layer: note.layer, tokens: note.tokens, hidden: note.hidden };
    // SAFETY: the caller vouched for `f` and `user` for the call; `pause` lives across the call
    // and its client pointer is used only by `djinn_pause_*` during it.
    let rc = unsafe { f(user, &mut pause, note.layer, note.tokens, note.hidden) };
    if rc == 0 {
        c.resume(session)
    } else {
        c.cancel(session)
    }
}

/// The pause behind a handle.
///
/// # Safety
/// `p` is NULL or the handle a pause callback received, during that callback.
unsafe fn pause_arg<'a>(p: *mut DjinnPause) -> Result<&'a mut DjinnPause, FfiError> {
    // SAFETY: NULL or valid per the contract.
    unsafe { p.as_mut() }.ok_or_else(|| FfiError::new(DJINN_E_NULL_ARG, "pause is NULL"))
}

/// See `djinn.h`.
///
/// # Safety
/// `pause` as given to the running pause callback; `out` writable for `n` floats.
#[no_mangle]
pub unsafe extern "C" fn djinn_pause_read(pause: *mut DjinnPause, out: *mut f32, n: usize) -> c_int {
    guard("djinn_pause_read", || {
        // SAFETY: per this function's contract.
        let p = unsafe { pause_arg(pause) }?;
        let want = p.tokens as usize * p.hidden as usize;
        if out.is_null() || n != want {
            return Err(FfiError::new(DJINN_E_INVALID_ARG, format!("out: {want} floats (tokens × hidden) needed")));
        }
        // SAFETY: the client pointer is valid and not otherwise used while the callback runs.
        let client = unsafe { &mut *p.client };
        let (_, values) = client.read_hidden_f32(p.session)?;
        if values.len() != want {
            return Err(FfiError::new(DJINN_E_PROTOCOL, format!("{} values for {want}", values.len())));
        }
        // SAFETY: `out` is writable for n == values.len() floats per the contract.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out, n) };
        Ok(())
    })
}

/// See `djinn.h`.
///
/// # Safety
/// `pause` as given to the running pause callback; `values` readable for `n` floats.
#[no_mangle]
pub unsafe extern "C" fn djinn_pause_write(pause: *mut DjinnPause, values: *const f32, n: usize) -> c_int {
    guard("djinn_pause_write", || {
        // SAFETY: per this function's contract.
        let p = unsafe { pause_arg(pause) }?;
        if values.is_null() {
            return Err(FfiError::new(DJINN_E_NULL_ARG, "values is NULL"));
        }
        // SAFETY: readable for n floats per the contract.
        let v = unsafe { std::slice::from_raw_parts(values, n) };
        // SAFETY: as in `djinn_pause_read`.
        let client = unsafe { &mut *p.client };
        // A wrong length reaches the server, which refuses it typed (ShapeMismatch).
        let tokens = if p.hidden == 0 { 0 } else { (n / p.hidden as usize) as u32 };
        client.write_hidden_f32(p.session, p.layer, tokens, p.hidden, v)?;
        Ok(())
    })
}

/// The input ids and breakpoint layers of a pass, checked: ids present, 1..=`BREAKPOINTS_MAX`
/// layers.
///
/// # Safety
/// Non-NULL `ids` / `layers` must be readable for `n_ids` / `n_layers` values for `'a`.
unsafe fn pass_args<'a>(
    ids: *const u32,
    n_ids: usize,
    layers: *const u32,
    n_layers: usize,
) -> Result<(&'a [u32], &'a [u32]), FfiError> {
    if ids.is_null() || n_ids == 0 {
        return Err(FfiError::new(DJINN_E_NULL_ARG, "ids: a pass with breakpoints needs input ids"));
    }
    if layers.is_null() || n_layers == 0 || n_layers > BREAKPOINTS_MAX {
        return Err(FfiError::new(DJINN_E_INVALID_ARG, format!("layers: 1..={BREAKPOINTS_MAX} layers needed")));
    }
    // SAFETY: non-NULL and readable for the lengths, per this function's contract.
    Ok(unsafe { (std::slice::from_raw_parts(ids, n_ids), std::slice::from_raw_parts(layers, n_layers)) })
}
