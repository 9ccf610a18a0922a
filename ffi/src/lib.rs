//! C ABI over djinn-client (header: `ffi/include/djinn.h`, which documents every function's
//! ownership rules; this file must stay in step with it).
//!
//! Invariants:
//! - No panic crosses the ABI: every exported function runs its body under [`guard`]
//!   (`catch_unwind`), and a panic becomes [`DJINN_E_PANIC`] with its message.
//! - Every pointer argument is checked for NULL and every string for UTF-8 before use; a bad
//!   argument is an error code, never undefined behaviour on our side.
//! - The last error message lives in a thread-local `CString`; the pointer handed out by
//!   [`djinn_last_error`] stays valid until the next `djinn_*` call on that thread.
//! - A `djinn_client` is a `Box<DjinnClient>` leaked to C by [`djinn_connect`] and reclaimed
//!   exactly once by [`djinn_client_free`].
//! - A call uses the client through a [`ClientLease`], taken by an atomic swap of its `busy` flag:
//!   a concurrent call from another thread, or a call from inside a token callback on the same
//!   client, fails with [`DJINN_E_CLIENT_BUSY`] instead of aliasing `&mut Client`. Only the
//!   `busy` and `counters` fields are touched through the raw pointer outside a lease, so a lease
//!   (which borrows the `client` field alone) is never aliased.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ops::{Deref, DerefMut};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use djinn_client::{
    Client, ClientError, ClientOptions, DecodeOptions, DecodeSummary, FinishReason, Input, OpenOptions, Qos,
    SessionInfo, TokenEvent,
};
use djinn_transport::ByteCounters;

mod breakpoint;
mod forward;
pub use breakpoint::{
    djinn_generate_ids_breakpoints, djinn_pause_read, djinn_pause_write, djinn_prefill_ids_breakpoints, DjinnPause,
    DjinnPauseCb,
};
use forward::TokenForwarder;

/// Success.
pub const DJINN_OK: c_int = 0;
/// A required pointer argument was NULL.
pub const DJINN_E_NULL_ARG: c_int = -1;
/// A string argument was not valid UTF-8.
pub const DJINN_E_INVALID_UTF8: c_int = -2;
/// An argument out of range.
pub const DJINN_E_INVALID_ARG: c_int = -3;
/// Bad URL, nothing listening, or the handshake failed.
pub const DJINN_E_CONNECT: c_int = -4;
/// The connection failed after it was established.
pub const DJINN_E_TRANSPORT: c_int = -5;
/// The server's reply could not be understood.
pub const DJINN_E_PROTOCOL: c_int = -6;
/// The token could not be read.
pub const DJINN_E_TOKEN: c_int = -7;
/// A panic inside the library.
pub const DJINN_E_PANIC: c_int = -8;
/// Any other client-side failure.
pub const DJINN_E_CLIENT: c_int = -9;
/// The client is in use by another call (another thread, or a token callback calling back in).
pub const DJINN_E_CLIENT_BUSY: c_int = -10;

pub const DJINN_INPUT_RAW: u32 = 0;
pub const DJINN_INPUT_CHAT: u32 = 1;

pub const DJINN_FINISH_EOS: u32 = 0;
pub const DJINN_FINISH_LENGTH: u32 = 1;
pub const DJINN_FINISH_STOP: u32 = 2;
pub const DJINN_FINISH_CANCELLED: u32 = 3;

/// Stop strings accepted from C before the count is rejected as garbage (the server's own bound
/// is smaller; this one only keeps a wild `stop_count` from walking memory).
pub const STOP_STRINGS_MAX: usize = 64;

/// The opaque client handle of the header (`djinn_client`).
pub struct DjinnClient {
    /// Set while a call holds the lease on `client`.
    busy: AtomicBool,
    /// The connection's byte counters, readable while `client` is leased (from a callback).
    counters: Arc<ByteCounters>,
    client: Client,
}

/// Exclusive use of a client for one call; releases the `busy` flag when dropped.
struct ClientLease<'a> {
    busy: &'a AtomicBool,
    client: &'a mut Client,
}

impl Deref for ClientLease<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client
    }
}

impl DerefMut for ClientLease<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client
    }
}

impl Drop for ClientLease<'_> {
    fn drop(&mut self) {
        // Release: this call's writes to the client happen-before the next lease's Acquire.
        self.busy.store(false, Ordering::Release);
    }
}

/// `djinn_session_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DjinnSessionInfo {
    pub session: u64,
    pub context_tokens: u32,
    pub max_tokens: u32,
    pub vocab: u32,
    pub has_tokenizer: u8,
    pub has_chat_template: u8,
}

/// `djinn_decode_params`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DjinnDecodeParams {
    pub max_new_tokens: u32,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
    pub ignore_eos: i32,
    pub stop: *const *const c_char,
    pub stop_count: usize,
}

/// `djinn_generate_result`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DjinnGenerateResult {
    pub prompt_tokens: u32,
    pub tokens: u32,
    pub finish: u32,
    pub context_tokens: u32,
}

/// `djinn_token_cb`.
pub type DjinnTokenCb =
    Option<unsafe extern "C" fn(user: *mut c_void, token: u32, text: *const c_char, text_len: usize) -> c_int>;

/// A failure on its way to C: code and message.
#[derive(Debug)]
struct FfiError {
    code: c_int,
    message: String,
}

impl FfiError {
    fn new(code: c_int, message: impl Into<String>) -> FfiError {
        FfiError { code, message: message.into() }
    }
}

impl From<ClientError> for FfiError {
    fn from(e: ClientError) -> FfiError {
        FfiError { code: client_code(&e), message: e.to_string() }
    }
}

/// The header's code for a client error: the server's status number when the server refused,
/// else the negative client-side code of its kind.
fn client_code(e: &ClientError) -> c_int {
    if let Some(st) = e.status() {
        return c_int::from(u16::from(st));
    }
    match e {
        ClientError::Connect { .. } => DJINN_E_CONNECT,
        ClientError::Transport(_) => DJINN_E_TRANSPORT,
        ClientError::Protocol { .. } => DJINN_E_PROTOCOL,
        ClientError::Token { .. } => DJINN_E_TOKEN,
        _ => DJINN_E_CLIENT,
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // Interior NULs would truncate the C string; show them instead of failing.
    let bytes: Vec<u8> = message.bytes().map(|b| if b == 0 { b'?' } else { b }).collect();
    let c = CString::new(bytes).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs an exported function's body: catches panics, records the error message, returns the code.
fn guard(name: &str, body: impl FnOnce() -> Result<(), FfiError>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => DJINN_OK,
        Ok(Err(e)) => {
            set_last_error(&format!("{name}: {}", e.message));
            e.code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("{name}: internal panic: {what}"));
            DJINN_E_PANIC
        }
    }
}

/// Reads a required C string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and unmodified for `'a`.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, FfiError> {
    if p.is_null() {
        return Err(FfiError::new(DJINN_E_NULL_ARG, format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and the caller guarantees NUL termination and validity for 'a.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map_err(|e| FfiError::new(DJINN_E_INVALID_UTF8, format!("{what} is not valid UTF-8: {e}")))
}

/// Takes the lease on the client handle for one call.
///
/// # Safety
/// `p` is NULL or a pointer returned by [`djinn_connect`] and not freed before `'a` ends.
unsafe fn client_arg<'a>(p: *mut DjinnClient) -> Result<ClientLease<'a>, FfiError> {
    if p.is_null() {
        return Err(FfiError::new(DJINN_E_NULL_ARG, "client is NULL"));
    }
    // SAFETY: `p` is live per the contract; this borrows the `busy` field alone (an atomic,
    // shared by design), never the whole struct, so it cannot alias a lease held on `client`.
    let busy = unsafe { &*std::ptr::addr_of!((*p).busy) };
    // Acquire pairs with the Release of the previous lease's drop.
    if busy.swap(true, Ordering::Acquire) {
        return Err(FfiError::new(
            DJINN_E_CLIENT_BUSY,
            "the client is in use by another call (another thread, or a token callback calling back into its own \
             client; only djinn_bytes_* may be called there)",
        ));
    }
    // SAFETY: we just won the busy flag, so no other lease (hence no other &mut) on `client`
    // exists until this one drops; the pointer is live for 'a per the contract.
    let client = unsafe { &mut *std::ptr::addr_of_mut!((*p).client) };
    Ok(ClientLease { busy, client })
}

fn info_to_c(i: &SessionInfo) -> DjinnSessionInfo {
    DjinnSessionInfo {
        session: i.session,
        context_tokens: i.context_tokens,
        max_tokens: i.max_tokens,
        vocab: i.vocab,
        has_tokenizer: u8::from(i.has_tokenizer),
        has_chat_template: u8::from(i.has_chat_template),
    }
}

fn finish_to_c(f: FinishReason) -> u32 {
    match f {
        FinishReason::Eos => DJINN_FINISH_EOS,
        FinishReason::Length => DJINN_FINISH_LENGTH,
        FinishReason::Stop => DJINN_FINISH_STOP,
        FinishReason::Cancelled => DJINN_FINISH_CANCELLED,
    }
}

fn default_params() -> DjinnDecodeParams {
    let d = DecodeOptions::default();
    DjinnDecodeParams {
        max_new_tokens: d.max_new_tokens,
        temperature: d.temperature,
        top_k: d.top_k,
        top_p: d.top_p,
        seed: d.seed,
        ignore_eos: i32::from(d.ignore_eos),
        stop: std::ptr::null(),
        stop_count: 0,
    }
}

/// Converts C decode parameters (NULL = defaults) into the client's options.
///
/// # Safety
/// `p` is NULL or points to a valid `djinn_decode_params` whose `stop` array (when `stop_count` is
/// non-zero) holds `stop_count` pointers to NUL-terminated strings, all valid during the call.
unsafe fn decode_options(p: *const DjinnDecodeParams) -> Result<DecodeOptions, FfiError> {
    // SAFETY: NULL or valid per the caller's contract; the struct is Copy, read once.
    let p = if p.is_null() { default_params() } else { unsafe { *p } };
    if p.stop_count > STOP_STRINGS_MAX {
        return Err(FfiError::new(
            DJINN_E_INVALID_ARG,
            format!("params.stop_count {} is over {STOP_STRINGS_MAX}", p.stop_count),
        ));
    }
    let mut stop = Vec::with_capacity(p.stop_count);
    if p.stop_count > 0 {
        if p.stop.is_null() {
            return Err(FfiError::new(DJINN_E_NULL_ARG, "params.stop is NULL but stop_count is not 0"));
        }
        // SAFETY: non-NULL array of stop_count pointers, valid per the caller's contract.
        let ptrs = unsafe { std::slice::from_raw_parts(p.stop, p.stop_count) };
        for (i, &s) in ptrs.iter().enumerate() {
            // SAFETY: each entry is NULL (rejected) or a NUL-terminated string valid for the call.
            stop.push(unsafe { str_arg(s, &format!("params.stop[{i}]")) }?.to_owned());
        }
    }
    // Written positively so NaN fails the check too.
    let in_range = p.temperature >= 0.0 && p.top_p > 0.0 && p.top_p <= 1.0;
    if !in_range {
        return Err(FfiError::new(
            DJINN_E_INVALID_ARG,
            format!("params: temperature {} must be >= 0 and top_p {} in (0, 1]", p.temperature, p.top_p),
        ));
    }
    Ok(DecodeOptions {
        max_new_tokens: p.max_new_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        seed: p.seed,
        stop,
        ignore_eos: p.ignore_eos != 0,
        ..DecodeOptions::default()
    })
}

/// What one generate call feeds before decoding.
enum Feed<'a> {
    Nothing,
    Ids(&'a [u32]),
    Raw(&'a str),
    Chat(&'a str),
}

/// Feeds, then decodes with `cb` per token; fills `out`.
///
/// # Safety
/// `cb`, when set, is safe to call with `user` for the duration of this call; `out` is NULL or
/// points to writable memory for one `djinn_generate_result`.
unsafe fn generate(
    client: &mut Client,
    session: u64,
    feed: Feed<'_>,
    opts: &DecodeOptions,
    cb: DjinnTokenCb,
    user: *mut c_void,
    out: *mut DjinnGenerateResult,
) -> Result<(), FfiError> {
    // The input travels with the decode: its forward pass also samples the first token.
    let feed = match feed {
        Feed::Nothing => None,
        Feed::Ids(ids) => Some(djinn_client::Feed::Ids(ids)),
        Feed::Raw(text) => Some(djinn_client::Feed::Text(text)),
        Feed::Chat(text) => Some(djinn_client::Feed::Turn { role: "user", text }),
    };
    // SAFETY: per this function's contract.
    let mut fwd = unsafe { TokenForwarder::new(cb, user) };
    let on_token = |ev: &TokenEvent<'_>| fwd.on_token(ev);
    let summary: DecodeSummary = match feed {
        Some(feed) if opts.max_new_tokens > 0 => client.generate(session, feed, opts, on_token)?,
        Some(feed) => {
            // Nothing to generate: a plain feed.
            let p = match feed {
                djinn_client::Feed::Ids(ids) => client.prefill(session, Input::Ids(ids))?,
                djinn_client::Feed::Text(text) => client.prefill(session, Input::Text(text))?,
                djinn_client::Feed::Turn { role, text } => client.append_turn(session, role, text)?,
            };
            DecodeSummary {
                tokens: 0,
                finish: FinishReason::Length,
                context_tokens: p.context_tokens,
                prompt_tokens: p.prompt_tokens,
            }
        }
        None => client.decode(session, opts, on_token)?,
    };
    // SAFETY: per this function's contract.
    unsafe { fwd.write_result(&summary, out) };
    Ok(())
}

// ---- exported functions --------------------------------------------------------------------------

/// See `djinn.h`.
#[no_mangle]
pub extern "C" fn djinn_last_error() -> *const c_char {
    // The pointer is into the thread-local CString, which is only replaced by a later call on this
    // thread: the header states the validity window.
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// See `djinn.h`.
#[no_mangle]
pub extern "C" fn djinn_code_name(code: c_int) -> *const c_char {
    let name: &'static CStr = match code {
        DJINN_OK => c"DJINN_OK",
        1 => c"DJINN_E_BAD_FRAME",
        2 => c"DJINN_E_BAD_MAGIC",
        3 => c"DJINN_E_BAD_VERSION",
        4 => c"DJINN_E_UNKNOWN_OPCODE",
        5 => c"DJINN_E_FRAME_TOO_LARGE",
        6 => c"DJINN_E_UNAUTHORIZED",
        7 => c"DJINN_E_BAD_HANDLE",
        8 => c"DJINN_E_SHAPE_MISMATCH",
        9 => c"DJINN_E_DTYPE_MISMATCH",
        10 => c"DJINN_E_BAD_ARGUMENT",
        11 => c"DJINN_E_OUT_OF_MEMORY",
        12 => c"DJINN_E_BUSY",
        13 => c"DJINN_E_SHUTTING_DOWN",
        14 => c"DJINN_E_UNKNOWN_MODEL",
        15 => c"DJINN_E_UNKNOWN_SESSION",
        16 => c"DJINN_E_INTERNAL",
        17 => c"DJINN_E_UNSUPPORTED",
        18 => c"DJINN_E_CANCELLED",
        19 => c"DJINN_E_LIMIT_EXCEEDED",
        20 => c"DJINN_E_NOT_PAUSED",
        DJINN_E_NULL_ARG => c"DJINN_E_NULL_ARG",
        DJINN_E_INVALID_UTF8 => c"DJINN_E_INVALID_UTF8",
        DJINN_E_INVALID_ARG => c"DJINN_E_INVALID_ARG",
        DJINN_E_CONNECT => c"DJINN_E_CONNECT",
        DJINN_E_TRANSPORT => c"DJINN_E_TRANSPORT",
        DJINN_E_PROTOCOL => c"DJINN_E_PROTOCOL",
        DJINN_E_TOKEN => c"DJINN_E_TOKEN",
        DJINN_E_PANIC => c"DJINN_E_PANIC",
        DJINN_E_CLIENT => c"DJINN_E_CLIENT",
        DJINN_E_CLIENT_BUSY => c"DJINN_E_CLIENT_BUSY",
        _ => c"unknown",
    };
    name.as_ptr()
}

/// See `djinn.h`.
#[no_mangle]
pub extern "C" fn djinn_version() -> *const c_char {
    const V: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => panic!("version has an interior NUL"),
    };
    V.as_ptr()
}

/// See `djinn.h`.
///
/// # Safety
/// `url` and `token` (when not NULL) are NUL-terminated strings valid for the call; `out` is NULL
/// or points to writable memory for one pointer.
#[no_mangle]
pub unsafe extern "C" fn djinn_connect(url: *const c_char, token: *const c_char, out: *mut *mut DjinnClient) -> c_int {
    guard("djinn_connect", || {
        if out.is_null() {
            return Err(FfiError::new(DJINN_E_NULL_ARG, "out is NULL"));
        }
        // SAFETY: per this function's contract.
        let url = unsafe { str_arg(url, "url") }?;
        let token = if token.is_null() {
            djinn_client::load_token(None)?
        } else {
            // SAFETY: non-NULL NUL-terminated string per this function's contract.
            Some(unsafe { str_arg(token, "token") }?.as_bytes().to_vec())
        };
        let opts = ClientOptions {
            token,
            client_name: format!("libdjinn/{}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        let client = Client::connect_with(url, &opts)?;
        let counters = client.counters();
        let handle = Box::into_raw(Box::new(DjinnClient { busy: AtomicBool::new(false), counters, client }));
        // SAFETY: `out` is non-NULL and writable per this function's contract.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// See `djinn.h`.
///
/// # Safety
/// `client` is NULL or a pointer from [`djinn_connect`] not yet freed; it is invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn djinn_client_free(client: *mut DjinnClient) {
    let _ = guard("djinn_client_free", || {
        if client.is_null() {
            return Ok(());
        }
        // SAFETY: live per the contract; the lease proves no call (e.g. the one running a token
        // callback that called us) is using the client.
        let lease = unsafe { client_arg(client) }?;
        drop(lease);
        // SAFETY: leaked by djinn_connect with Box::into_raw and freed only here, once; no lease
        // is held (the one above was released and the caller gives up the pointer).
        drop(unsafe { Box::from_raw(client) });
        Ok(())
    });
}

/// See `djinn.h`.
///
/// # Safety
/// `client` is NULL or a live pointer from [`djinn_connect`].
#[no_mangle]
pub unsafe extern "C" fn djinn_bytes_sent(client: *const DjinnClient) -> u64 {
    if client.is_null() {
        return 0;
    }
    // SAFETY: live per the contract; borrows the `counters` field alone (atomics behind an Arc),
    // which no lease touches, so this is allowed even from a token callback.
    unsafe { &*std::ptr::addr_of!((*client).counters) }.sent()
}

/// See `djinn.h`.
///
/// # Safety
/// `client` is NULL or a live pointer from [`djinn_connect`].
#[no_mangle]
pub unsafe extern "C" fn djinn_bytes_received(client: *const DjinnClient) -> u64 {
    if client.is_null() {
        return 0;
    }
    // SAFETY: as in djinn_bytes_sent.
    unsafe { &*std::ptr::addr_of!((*client).counters) }.received()
}

/// See `djinn.h`.
///
/// # Safety
/// `client` is NULL or a live pointer from [`djinn_connect`] used by no other thread during the
/// call; `model` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn djinn_session_open(
    client: *mut DjinnClient,
    model: *const c_char,
    qos: u32,
    max_tokens: u32,
    out: *mut DjinnSessionInfo,
) -> c_int {
    guard("djinn_session_open", || {
        // SAFETY: per this function's contract.
        let mut client = unsafe { client_arg(client) }?;
        // SAFETY: per this function's contract.
        let model = unsafe { str_arg(model, "model") }?;
        if out.is_null() {
            return Err(FfiError::new(DJINN_E_NULL_ARG, "out is NULL"));
        }
        let qos = match qos {
            0 => Qos::Interactive,
            1 => Qos::Batch,
            2 => Qos::Background,
            3 => Qos::Realtime,
            other => return Err(FfiError::new(DJINN_E_INVALID_ARG, format!("qos {other}: expected 0, 1, 2 or 3"))),
        };
        let info = client.open_session(&OpenOptions { qos, max_tokens, ..OpenOptions::new(model) })?;
        // SAFETY: non-NULL and writable per this function's contract.
        unsafe { out.write(info_to_c(&info)) };
        Ok(())
    })
}

/// See `djinn.h`.
///
/// # Safety
/// `client` as for [`djinn_session_open`]; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn djinn_session_attach(
    client: *mut DjinnClient,
    session: u64,
    out: *mut DjinnSessionInfo,
) -> c_int {
    guard("djinn_session_attach", || {
        // SAFETY: per this function's contract.
        let mut client = unsafe { client_arg(client) }?;
        let info = client.attach_session(session)?;
        if !out.is_null() {
            // SAFETY: non-NULL and writable per this function's contract.
            unsafe { out.write(info_to_c(&info)) };
        }
        Ok(())
    })
}

/// See `djinn.h`.
///
/// # Safety
/// `client` as for [`djinn_session_open`]; `text` a NUL-terminated string; `params` NULL or valid
/// (see the header); `cb` NULL or callable with `user` during the call; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn djinn_generate_text(
    client: *mut DjinnClient,
    session: u64,
    mode: u32,
    text: *const c_char,
    params: *const DjinnDecodeParams,
    cb: DjinnTokenCb,
    user: *mut c_void,
    out: *mut DjinnGenerateResult,
) -> c_int {
    guard("djinn_generate_text", || {
        // SAFETY: per this function's contract.
        let mut client = unsafe { client_arg(client) }?;
        // SAFETY: per this function's contract.
        let text = unsafe { str_arg(text, "text") }?;
        // SAFETY: per this function's contract.
        let opts = unsafe { decode_options(params) }?;
        let feed = match mode {
            DJINN_INPUT_RAW if text.is_empty() => Feed::Nothing,
            DJINN_INPUT_RAW => Feed::Raw(text),
            DJINN_INPUT_CHAT => Feed::Chat(text),
            other => {
                return Err(FfiError::new(DJINN_E_INVALID_ARG, format!("mode {other}: expected 0 (raw) or 1 (chat)")))
            }
        };
        // SAFETY: cb/user/out per this function's contract.
        unsafe { generate(&mut client, session, feed, &opts, cb, user, out) }
    })
}

/// See `djinn.h`.
///
/// # Safety
/// `client` as for [`djinn_session_open`]; `ids` points to `n_ids` readable u32 (or is NULL with
/// `n_ids` 0); `params`, `cb`, `user`, `out` as for [`djinn_generate_text`].
#[no_mangle]
pub unsafe extern "C" fn djinn_generate_ids(
    client: *mut DjinnClient,
    session: u64,
    ids: *const u32,
    n_ids: usize,
    params: *const DjinnDecodeParams,
    cb: DjinnTokenCb,
    user: *mut c_void,
    out: *mut DjinnGenerateResult,
) -> c_int {
    guard("djinn_generate_ids", || {
        // SAFETY: per this function's contract.
        let mut client = unsafe { client_arg(client) }?;
        let feed = if n_ids == 0 {
            Feed::Nothing
        } else if ids.is_null() {
            return Err(FfiError::new(DJINN_E_NULL_ARG, "ids is NULL but n_ids is not 0"));
        } else {
            // SAFETY: non-NULL, n_ids readable u32 valid for the call per this function's contract.
            Feed::Ids(unsafe { std::slice::from_raw_parts(ids, n_ids) })
        };
        // SAFETY: per this function's contract.
        let opts = unsafe { decode_options(params) }?;
        // SAFETY: cb/user/out per this function's contract.
        unsafe { generate(&mut client, session, feed, &opts, cb, user, out) }
    })
}

/// See `djinn.h`.
///
/// # Safety
/// `client` as for [`djinn_session_open`].
#[no_mangle]
pub unsafe extern "C" fn djinn_session_close(client: *mut DjinnClient, session: u64) -> c_int {
    guard("djinn_session_close", || {
        // SAFETY: per this function's contract.
        let mut client = unsafe { client_arg(client) }?;
        client.close_session(session)?;
        Ok(())
    })
}

/// See `djinn.h`.
///
/// # Safety
/// `params` is NULL (no-op) or points to writable memory for one `djinn_decode_params`.
#[no_mangle]
pub unsafe extern "C" fn djinn_decode_params_default(params: *mut DjinnDecodeParams) {
    if !params.is_null() {
        // SAFETY: non-NULL and writable per the contract.
        unsafe { params.write(default_params()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: djinn_last_error returns a valid NUL-terminated string owned by this thread.
        unsafe { CStr::from_ptr(djinn_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn null_and_bad_arguments_are_codes_with_messages() {
        let mut out: *mut DjinnClient = std::ptr::null_mut();
        // SAFETY: every pointer is NULL or valid for the call.
        unsafe {
            assert_eq!(djinn_connect(std::ptr::null(), std::ptr::null(), &mut out), DJINN_E_NULL_ARG);
            assert!(last_error().contains("url is NULL"), "{}", last_error());
            assert_eq!(
                djinn_connect(c"tcp://127.0.0.1:1".as_ptr(), std::ptr::null(), std::ptr::null_mut()),
                DJINN_E_NULL_ARG
            );
            let bad = [0xffu8, 0xfe, 0];
            assert_eq!(djinn_connect(bad.as_ptr().cast(), std::ptr::null(), &mut out), DJINN_E_INVALID_UTF8);
            assert!(last_error().contains("UTF-8"), "{}", last_error());
            assert_eq!(djinn_connect(c"gopher://x".as_ptr(), std::ptr::null(), &mut out), DJINN_E_CONNECT);
            assert!(last_error().contains("gopher"), "{}", last_error());
            assert!(out.is_null(), "no client on failure");
            let mut info = DjinnSessionInfo::default();
            assert_eq!(djinn_session_open(std::ptr::null_mut(), c"m".as_ptr(), 0, 0, &mut info), DJINN_E_NULL_ARG);
            assert!(last_error().contains("client is NULL"));
            assert_eq!(djinn_session_close(std::ptr::null_mut(), 1), DJINN_E_NULL_ARG);
            assert_eq!(
                djinn_generate_ids(
                    std::ptr::null_mut(),
                    1,
                    std::ptr::null(),
                    0,
                    std::ptr::null(),
                    None,
                    std::ptr::null_mut(),
                    std::ptr::null_mut()
                ),
                DJINN_E_NULL_ARG
            );
            djinn_client_free(std::ptr::null_mut());
            assert_eq!(djinn_bytes_sent(std::ptr::null()), 0);
        }
    }

    #[test]
    fn decode_params_are_checked() {
        let mut p = default_params();
        // SAFETY: writes one params struct into valid memory.
        unsafe { djinn_decode_params_default(&mut p) };
        assert_eq!(p.max_new_tokens, 128);
        p.stop_count = 1;
        // SAFETY: `p` is valid; its stop array is NULL, which must be rejected, not read.
        let e = unsafe { decode_options(&p) }.unwrap_err();
        assert_eq!(e.code, DJINN_E_NULL_ARG);
        let stops = [c"\n\n".as_ptr()];
        p.stop = stops.as_ptr();
        // SAFETY: one valid NUL-terminated string.
        let o = unsafe { decode_options(&p) }.unwrap();
        assert_eq!(o.stop, vec!["\n\n".to_string()]);
        p.top_p = 0.0;
        // SAFETY: as above.
        assert_eq!(unsafe { decode_options(&p) }.unwrap_err().code, DJINN_E_INVALID_ARG);
        p.top_p = 1.0;
        p.stop_count = STOP_STRINGS_MAX + 1;
        // SAFETY: the count is rejected before the array is read.
        assert_eq!(unsafe { decode_options(&p) }.unwrap_err().code, DJINN_E_INVALID_ARG);
    }

    #[test]
    fn code_names_cover_the_header() {
        for code in -10..=19 {
            // SAFETY: static NUL-terminated strings.
            let n = unsafe { CStr::from_ptr(djinn_code_name(code)) }.to_str().unwrap();
            assert!(n.starts_with("DJINN_"), "{code}: {n}");
        }
        // SAFETY: static NUL-terminated string.
        assert_eq!(unsafe { CStr::from_ptr(djinn_code_name(1000)) }.to_str().unwrap(), "unknown");
        // SAFETY: static NUL-terminated string.
        assert_eq!(unsafe { CStr::from_ptr(djinn_version()) }.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn a_panic_becomes_a_code() {
        let code = guard("test", || panic!("boom"));
        assert_eq!(code, DJINN_E_PANIC);
        assert!(last_error().contains("boom"));
    }
}
